"""Compare backbones under one manifest's heads in one run: dev quality, batch invariance, speed.

    python -m emostream.models.training.compare --manifest minilm-ft-emotions \\
        --backbone "dynamic INT8 (ft-3)=runs/int8/minilm-ft3-int8.onnx" \\
        --backbone "batch-invariant INT8 (ft-4)=models/backbones/minilm-ft-int8.onnx" \\
        --backbone "fp32=runs/int8/minilm-ft3-fp32.onnx" --out runs/int8/compare

Per backbone, with the manifest's heads and **its own thresholds tuned on dev** (as an export
would ship them): macro-F1 of every head, tuned and cross-fitted (thresholds tuned on one half
of dev, scored on the other); label sets differing from the first backbone's at the shipped
thresholds; the max |score| difference between texts scored alone and inside one batch of 512.
Then speed, interleaved over ``--rounds`` so that load elsewhere on a shared machine hits every
backbone alike: the raw model (the encoder's own sub-batching, the worker's batch size, token
budget, streams and threads) and the worker's pipeline (Enricher on JSON records, no Kafka),
texts per second of wall time and per CPU-second of this process, best and median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..manifest import find_manifest
from ..model import EmotionModel
from .data import DATA_DIR
from .export import dev_gold, score

log = logging.getLogger(__name__)


def load_with_backbone(manifest: str, onnx: Path, streams: int = 1, threads: int = 0) -> EmotionModel:
    """The manifest's model with its backbone file swapped for ``onnx``."""
    m = find_manifest(manifest)
    m = dataclasses.replace(m, backbone=dataclasses.replace(m.backbone, onnx=Path(onnx).resolve()))
    return EmotionModel(m, threads=threads, streams=streams)


def quality(model: EmotionModel, texts: Sequence[str], gold: dict, labels: Sequence[str]) -> tuple[dict, dict]:
    """(per-head dev metrics with thresholds tuned on these scores, label sets at the shipped thresholds)."""
    pred = model.predict(texts, max_tokens=512)
    results, _ = score({k: v.probs for k, v in pred.heads.items()}, gold, labels)
    return results, {k: v.selected for k, v in pred.heads.items()}


def invariance(model: EmotionModel, texts: Sequence[str]) -> float:
    """Max |score| difference, any head, between each text alone and inside one batch of ``texts``."""
    together = model.predict(texts, max_tokens=10**9).heads
    alone = [model.predict([t]).heads for t in texts]
    return max(float(np.abs(np.concatenate([a[h].probs for a in alone]) - together[h].probs).max())
               for h in together)


def speed(models: dict[str, tuple[EmotionModel, object]], texts: Sequence[str], rounds: int) -> dict:
    """Raw model and pipeline texts/s per backbone, rounds interleaved across backbones."""
    import orjson

    from emostream.worker.decode import RawMessage
    from emostream.worker.settings import Settings

    settings = Settings.from_env(environ={})
    msgs = [RawMessage(orjson.dumps({"id": str(i), "text": t}), None, "texts", 0, i, 1.7e9)
            for i, t in enumerate(texts)]
    size, budget = settings.batch_max, settings.batch_max_tokens

    def raw(model, _):
        for i in range(0, len(texts), size):
            model.encoder.embed(texts[i:i + size], max_tokens=budget)

    def pipeline(_, enricher):
        for i in range(0, len(msgs), size):
            enricher(msgs[i:i + size])

    runs: dict = {stage: {name: {"wall": [], "cpu": []} for name in models} for stage in ("raw", "pipeline")}
    for _ in range(rounds):
        for stage, fn in (("raw", raw), ("pipeline", pipeline)):
            for name, (model, enricher) in models.items():
                t, c = time.perf_counter(), time.process_time()
                fn(model, enricher)
                runs[stage][name]["wall"].append(len(texts) / (time.perf_counter() - t))
                runs[stage][name]["cpu"].append(len(texts) / (time.process_time() - c))
    return {stage: {name: {k: {"best": round(max(v), 1), "median": round(statistics.median(v), 1),
                               "runs": [round(x, 1) for x in v]} for k, v in r.items()}
                    for name, r in by_name.items()} for stage, by_name in runs.items()}


def compare(manifest: str, backbones: dict[str, Path], data_dir: Path = DATA_DIR, n_speed: int = 1000,
            rounds: int = 7, n_invariance: int = 512) -> dict:
    from emostream.worker.pipeline import Enricher
    from emostream.worker.settings import Settings

    labels, texts, gold = dev_gold(data_dir)
    settings = Settings.from_env(environ={})
    out: dict = {"manifest": manifest, "n_dev": len(texts), "backbones": {}}
    first = None
    for name, path in backbones.items():
        model = load_with_backbone(manifest, path, threads=2)
        res, selected = quality(model, texts, gold, labels)
        first = first or selected
        diff = np.any([(selected[h] != first[h]).any(1) for h in selected], axis=0)
        out["backbones"][name] = {
            "file": str(path), "mb": round(Path(path).stat().st_size / 2**20, 1),
            "dev": {h: {k: v for k, v in r.items() if k != "per_label_f1"} for h, r in res.items()},
            "label_sets_differing_from_first": int(diff.sum()),
            "alone_vs_batch_max_abs_diff": invariance(model, texts[:n_invariance]),
        }
        log.info("%s: %s", name, out["backbones"][name])
    models = {}
    for name, path in backbones.items():  # the worker's runtime: its streams × threads, batch size, budget
        model = load_with_backbone(manifest, path, settings.inference_streams, settings.inference_threads)
        enricher = Enricher(model, settings)
        model.encoder.embed(texts[:256], max_tokens=settings.batch_max_tokens)  # warm-up
        models[name] = (model, enricher)
    out["speed"] = speed(models, texts[:n_speed], rounds)
    out["speed"]["texts"], out["speed"]["rounds"] = min(n_speed, len(texts)), rounds
    return out


def markdown(result: dict) -> str:
    names = list(result["backbones"])
    rows = [("file size (MB)", lambda b: f"{b['mb']}")]
    for head, key in (("go_emotions", "tuned"), ("ekman", "tuned")):
        rows.append((f"{head} macro-F1, dev-tuned / cross-fitted",
                     lambda b, h=head: f"{b['dev'][h]['tuned']['f1']:.4f} / {b['dev'][h]['crossfit_f1']:.4f}"))
    rows += [("sentiment macro-F1 (argmax)", lambda b: f"{b['dev']['sentiment']['argmax']['f1']:.4f}"),
             (f"label sets differing from {names[0]}", lambda b: f"{b['label_sets_differing_from_first']}"),
             ("alone vs batch: max score difference", lambda b: f"{b['alone_vs_batch_max_abs_diff']:.3g}")]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(result["backbones"][n]) for n in names) + " |" for label, fn in rows]
    for stage in ("raw", "pipeline"):
        for k, unit in (("wall", "texts/s"), ("cpu", "texts per CPU-second")):
            s = result["speed"][stage]
            lines.append(f"| {stage}: {unit}, best / median | " + " | ".join(
                f"{s[n][k]['best']:.0f} / {s[n][k]['median']:.0f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default="minilm-ft-emotions", help="heads, thresholds, tokenizer and pooling")
    ap.add_argument("--backbone", action="append", required=True, metavar="NAME=PATH",
                    help="a backbone .onnx to compare (repeat; the first is the reference for label sets)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--n-speed", type=int, default=1000, help="dev texts per speed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, help="write compare.json and compare.md here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    backbones = {}
    for spec in args.backbone:
        name, sep, path = spec.rpartition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"--backbone {spec!r}: expected NAME=PATH to an existing file")
        backbones[name] = Path(path)
    if not (args.data_dir / "dev.tsv").is_file():
        ap.error(f"no dev.tsv in {args.data_dir}")
    result = compare(args.manifest, backbones, args.data_dir, args.n_speed, args.rounds)
    md = markdown(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "compare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
