"""Fine-tune a BERT-family backbone jointly with the go_emotions / ekman / sentiment heads.

    python -m emostream.models.training.finetune --out runs/ft --epochs 4
    python -m emostream.models.training.finetune --out runs/teacher --backbone runs/all-mpnet-base-v2
    python -m emostream.models.training.finetune predict --checkpoint runs/teacher/epoch-2.pt --out teacher.npz
    python -m emostream.models.training.finetune --out runs/student --teacher teacher.npz

Loss: BCE(go_emotions, 28) + BCE(ekman, 7) + CE(sentiment, 4) with labels derived as in
:mod:`.data`. With ``--teacher`` (a fine-tuned teacher's probabilities on train, written by
``predict``) each head's target is ``(1 − α)·gold + α·teacher`` (soft BCE / soft cross-entropy,
α = ``--distill-weight``): knowledge distillation from a larger model into the MiniLM student.
The backbone is all-MiniLM-L6-v2 unless ``--backbone`` names another HF folder (BERT or MPNet). Mean pooling + L2 normalisation (what the worker computes), AdamW with separate
backbone / head learning rates, linear warmup then linear decay, fixed seeds. Batches are
length-bucketed with dynamic padding (CPU cost is the padded size). A checkpoint is written at
the end of every epoch (``epoch-N.pt``) and, with ``--save-every``, every so many steps
(``last.pt`` always holds the newest); ``--resume`` continues from ``last.pt`` at the exact batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..linear_head import crossfit_macro_f1, f1_report, read_goemotions, transferable_thresholds, tune_thresholds
import dataclasses

from .bert import Bert, BertConfig, EmotionNet, default_model_dir
from .data import (DATA_DIR, EKMAN_LABELS, SENTIMENT_LABELS, bucket_batches, ekman_targets, load_label_sets,
                   pad_batch, sentiment_targets)

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer(max_length: int, model_dir: Path | None = None):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str((model_dir or default_model_dir()) / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json fixes padding at 128: pad per batch instead
    tok.enable_truncation(max_length=max_length)
    return tok


def encode(tok, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
    """Token ids of each text with ``prefix`` in front (E5's ``"query: "``): one place, so the
    English rows and their translated copies are tokenized alike."""
    return [e.ids for e in tok.encode_batch([prefix + t for t in texts])]


class Split:
    """Token ids and the three target sets of one TSV (``prefix`` goes before every text, e.g.
    E5's ``"query: "``)."""

    def __init__(self, path: Path, tok, labels, ek_M, se_M, limit: int | None = None, prefix: str = ""):
        texts, y = read_goemotions(path, len(labels))
        if limit:
            texts, y = texts[:limit], y[:limit]
        self.texts = texts
        self.ids = encode(tok, texts, prefix)
        self.lengths = [len(x) for x in self.ids]
        self.go = y.astype(np.float32)
        self.ekman = ekman_targets(y, ek_M).astype(np.float32)
        self.sentiment = sentiment_targets(y, se_M)
        self.soft: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def distill(self, teacher: dict[str, np.ndarray], weight: float) -> None:
        """Targets become (1 − weight)·gold + weight·teacher probabilities (same rows, same order)."""
        for k, v in teacher.items():
            if len(v) != len(self):
                raise ValueError(f"teacher {k} has {len(v)} rows, the training split {len(self)}")
        onehot = np.eye(len(SENTIMENT_LABELS), dtype=np.float32)[self.sentiment]
        self.soft = {"go_emotions": (1 - weight) * self.go + weight * teacher["go_emotions"],
                     "ekman": (1 - weight) * self.ekman + weight * teacher["ekman"],
                     "sentiment": (1 - weight) * onehot + weight * teacher["sentiment"]}
        self.soft = {k: v.astype(np.float32) for k, v in self.soft.items()}

    def add_translations(self, paths: Sequence[Path], share: float, tok, prefix: str, seed: int) -> int:
        """Append, for a ``share`` of the rows (seeded), the same row from one of ``paths`` (TSVs aligned
        row by row with this split: ``translate_train``). The copy keeps the English row's targets,
        teacher probabilities included: call after :meth:`distill`. Returns the rows added."""
        n = len(self)
        sources = []
        for p in paths:
            texts, y = read_goemotions(p, self.go.shape[1])
            if len(texts) < n or not np.array_equal(y[:n], self.go.astype(y.dtype)):
                raise ValueError(f"{p}: not aligned row by row with the training split")
            sources.append(texts[:n])
        rng = np.random.default_rng(seed)
        rows = np.flatnonzero(rng.random(n) < share)
        pick = rng.integers(len(sources), size=len(rows))
        new = [sources[k][i] for i, k in zip(rows, pick)]
        ids = encode(tok, new, prefix)
        self.ids += ids
        self.lengths += [len(x) for x in ids]
        self.texts += new
        self.go = np.concatenate([self.go, self.go[rows]])
        self.ekman = np.concatenate([self.ekman, self.ekman[rows]])
        self.sentiment = np.concatenate([self.sentiment, self.sentiment[rows]])
        if self.soft is not None:
            self.soft = {k: np.concatenate([v, v[rows]]) for k, v in self.soft.items()}
        return len(rows)

    def batch(self, idx: Sequence[int], device):
        ids, mask = pad_batch([self.ids[i] for i in idx])
        t = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
        if self.soft is not None:
            return t(ids), t(mask), {k: t(v[idx]) for k, v in self.soft.items()}
        return t(ids), t(mask), {"go_emotions": t(self.go[idx]), "ekman": t(self.ekman[idx]),
                                 "sentiment": t(self.sentiment[idx])}


def pos_weights(y: np.ndarray, power: float, cap: float) -> np.ndarray | None:
    """Per-label BCE weight of positives, (negatives / positives) ** power clipped to [1, cap].

    power 0 = off; 0.5 lifts rare labels (grief, relief, pride: < 0.3 % of train) without the
    precision collapse of full inverse-frequency weights."""
    if power <= 0:
        return None
    pos = y.sum(axis=0).astype(np.float64)
    ratio = (len(y) - pos) / np.maximum(pos, 1.0)
    return np.clip(ratio ** power, 1.0, cap).astype(np.float32)


def loss_fn(out: dict, target: dict, pos_weight: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Sum of the three heads' losses; targets may be soft (probabilities), sentiment's a class index
    or a distribution."""
    pw = pos_weight or {}
    out = {k: v.float() for k, v in out.items()}
    parts = {
        "go_emotions": F.binary_cross_entropy_with_logits(out["go_emotions"], target["go_emotions"],
                                                          pos_weight=pw.get("go_emotions")),
        "ekman": F.binary_cross_entropy_with_logits(out["ekman"], target["ekman"], pos_weight=pw.get("ekman")),
        "sentiment": F.cross_entropy(out["sentiment"], target["sentiment"]),
    }
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


def autocast(device, bf16: bool):
    """bfloat16 autocast (AMX / tensor cores do the matmuls), or nothing."""
    import contextlib

    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def predict(model: EmotionNet, split: Split, device, batch_size: int = 128, bf16: bool = False) -> dict[str, np.ndarray]:
    """Probabilities per head (sigmoid / softmax) in split order."""
    model.eval()
    out = {k: np.zeros((len(split), m.out_features), dtype=np.float32) for k, m in model.heads.items()}
    for idx in bucket_batches(split.lengths, batch_size, shuffle=False):
        ids, mask = (torch.as_tensor(a).to(device) for a in pad_batch([split.ids[i] for i in idx]))
        with autocast(device, bf16):
            logits = model(ids, mask)
        for k, v in logits.items():
            p = v.softmax(-1) if k == "sentiment" else v.sigmoid()
            out[k][idx] = p.float().cpu().numpy()
    return out


def dev_metrics(probs: dict[str, np.ndarray], split: Split, labels) -> dict:
    """Macro F1 per head: multi-label heads with thresholds tuned on these rows and at 0.5;
    the single-label sentiment head by argmax."""
    res = {}
    for name, y, names in (("go_emotions", split.go, labels), ("ekman", split.ekman, EKMAN_LABELS)):
        thr = tune_thresholds(probs[name], y)
        res[name] = {"macro_f1_tuned": f1_report(probs[name], y, thr)["macro"]["f1"],
                     "macro_f1_crossfit": crossfit_macro_f1(probs[name], y),
                     # what picks the epoch: thresholds that transfer, scored on rows they never saw
                     "macro_f1_crossfit_transfer": crossfit_macro_f1(probs[name], y, splits=10,
                                                                     tuner=transferable_thresholds),
                     "macro_f1_at_0.5": f1_report(probs[name], y, 0.5)["macro"]["f1"]}
    onehot = np.eye(len(SENTIMENT_LABELS))[split.sentiment]
    pred = np.eye(len(SENTIMENT_LABELS))[probs["sentiment"].argmax(1)]
    res["sentiment"] = {"macro_f1_argmax": f1_report(pred, onehot, 0.5)["macro"]["f1"],
                        "accuracy": float((probs["sentiment"].argmax(1) == split.sentiment).mean())}
    return res


def build(device, dropout: float = 0.1, backbone: Path | None = None) -> EmotionNet:
    """The emotion net over a pre-trained backbone (a HF folder; all-MiniLM-L6-v2 by default)."""
    return EmotionNet(Bert.from_pretrained(backbone), {"go_emotions": 28, "ekman": len(EKMAN_LABELS),
                                                      "sentiment": len(SENTIMENT_LABELS)}, dropout=dropout).to(device)


def load_checkpoint(path: str | Path, device="cpu") -> tuple[EmotionNet, dict]:
    """A trained checkpoint's model (its backbone architecture rebuilt from the config it saved)."""
    ck = torch.load(path, map_location=device, weights_only=False)
    hp = ck.get("hparams") or {}
    backbone = Bert(BertConfig(**hp["backbone_config"])) if hp.get("backbone_config") else Bert.from_pretrained()
    heads = {k.split(".")[1]: v.shape[0] for k, v in ck["model"].items() if k.startswith("heads.") and k.endswith(".bias")}
    model = EmotionNet(backbone, heads).to(device)
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def optimizer_and_schedule(model: EmotionNet, lr_backbone: float, lr_heads: float, total_steps: int,
                           warmup: float, weight_decay: float = 0.01, freeze_word_embeddings: bool = True,
                           freeze_layers: int = 0):
    # The 30522x384 word-embedding table is half the parameters; its dense gradient and AdamW
    # state cost CPU time for little gain, so by default it stays as pre-trained.
    model.backbone.word.weight.requires_grad_(not freeze_word_embeddings)
    if freeze_layers:  # the other embeddings and the lowest layers too: backward stops above them
        bb = model.backbone
        for module in (bb.position, bb.token_type, bb.relative_bias, bb.emb_norm, *bb.layers[:freeze_layers]):
            if module is not None:
                module.requires_grad_(False)
    bb = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    hd = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW([{"params": bb, "lr": lr_backbone}, {"params": hd, "lr": lr_heads}],
                            weight_decay=weight_decay)
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(out_dir: Path, data_dir: Path = DATA_DIR, epochs: int = 3, batch_size: int = 32,
          lr_backbone: float = 8e-5, lr_heads: float = 1e-3, warmup: float = 0.06, max_length: int = 64,
          seed: int = 13, device: str = "auto", threads: int = 2, resume: bool = False,
          limit_train: int | None = None, limit_dev: int | None = None, save_every: int = 0,
          max_steps: int | None = None, progress: bool = True, pos_weight_power: float = 0.5,
          pos_weight_max: float = 10.0, backbone: Path | None = None, prefix: str = "",
          teacher: Path | None = None, distill_weight: float = 0.5, bf16: bool = False,
          freeze_word_embeddings: bool = True, freeze_layers: int = 0,
          translations: Sequence[Path] = (), translation_share: float = 0.5) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    set_seed(seed)
    labels, ek_M, se_M = load_label_sets(data_dir)
    tok = tokenizer(max_length, backbone)
    t0 = time.perf_counter()
    tr = Split(data_dir / "train.tsv", tok, labels, ek_M, se_M, limit_train, prefix)
    dev = Split(data_dir / "dev.tsv", tok, labels, ek_M, se_M, limit_dev, prefix)
    log.info("tokenized %d train / %d dev texts in %.1fs (mean %.1f tokens)", len(tr), len(dev),
             time.perf_counter() - t0, float(np.mean(tr.lengths)))
    if teacher is not None:
        # rows in file order: --limit-train keeps the first ones, so the teacher's first ones match
        tr.distill({k: v[:len(tr)] for k, v in load_teacher(teacher, data_dir / "train.tsv").items()}, distill_weight)
    n_english = len(tr)
    if translations:
        added = tr.add_translations(translations, translation_share, tok, prefix, seed)
        log.info("added %d translated copies from %d files", added, len(translations))
    model = build(device, backbone=backbone)
    pos_weight = {}
    for name, y in (("go_emotions", tr.go), ("ekman", tr.ekman)):
        w = pos_weights(np.asarray(y[:n_english]), pos_weight_power, pos_weight_max)
        if w is not None:
            pos_weight[name] = torch.as_tensor(w).to(device)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    total = steps_per_epoch * epochs
    opt, sched = optimizer_and_schedule(model, lr_backbone, lr_heads, total, warmup,
                                        freeze_word_embeddings=freeze_word_embeddings, freeze_layers=freeze_layers)
    hparams = dict(epochs=epochs, batch_size=batch_size, lr_backbone=lr_backbone, lr_heads=lr_heads,
                   warmup=warmup, max_length=max_length, seed=seed, weight_decay=0.01, dropout=0.1,
                   schedule="linear warmup + linear decay", n_train=len(tr), n_dev=len(dev),
                   pos_weight_power=pos_weight_power, pos_weight_max=pos_weight_max,
                   backbone=str(backbone or default_model_dir()),
                   backbone_config=dataclasses.asdict(model.backbone.config), prefix=prefix,
                   teacher=str(teacher) if teacher else None, distill_weight=distill_weight if teacher else 0.0,
                   bf16=bf16, freeze_word_embeddings=freeze_word_embeddings, freeze_layers=freeze_layers,
                   translations=[str(p) for p in translations], translation_share=translation_share if translations else 0.0)
    history: list[dict] = []
    start_epoch, start_batch = 0, 0
    last = out_dir / "last.pt"
    if resume and last.is_file():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, start_batch, history = ck["epoch"], ck["batch"], ck.get("history", [])
        torch.set_rng_state(ck["torch_rng"])
        log.info("resumed from %s at epoch %d batch %d", last, start_epoch, start_batch)

    def save(epoch: int, batch: int, name: str | None = None) -> None:
        ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "epoch": epoch, "batch": batch, "history": history, "hparams": hparams,
              "labels": {"go_emotions": labels, "ekman": list(EKMAN_LABELS), "sentiment": list(SENTIMENT_LABELS)},
              "torch_rng": torch.get_rng_state()}
        tmp = out_dir / f".{os.getpid()}.tmp.pt"
        torch.save(ck, tmp)
        if name:
            torch.save(ck, out_dir / name)
        os.replace(tmp, last)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    steps_done = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        for epoch in range(start_epoch, epochs):
            batches = bucket_batches(tr.lengths, batch_size, shuffle=True, seed=seed * 1000 + epoch)
            task = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=len(batches), completed=start_batch, info="")
            model.train()
            t_ep, n_texts, run_loss = time.perf_counter(), 0, None
            for b in range(start_batch, len(batches)):
                ids, mask, target = tr.batch(batches[b], device)
                with autocast(device, bf16):
                    out = model(ids, mask)
                loss, parts = loss_fn(out, target, pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                n_texts += len(batches[b])
                steps_done += 1
                lv = float(loss.detach())
                run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
                rate = n_texts / (time.perf_counter() - t_ep)
                bar.update(task, advance=1, info=f"loss {run_loss:.4f} {rate:.0f} texts/s")
                if (b + 1) % 25 == 0:
                    log.info("epoch %d step %d/%d loss %.4f %.1f texts/s", epoch + 1, b + 1, len(batches), run_loss, rate)
                if save_every and (b + 1) % save_every == 0 and b + 1 < len(batches):
                    save(epoch, b + 1)
                if max_steps and steps_done >= max_steps:
                    save(epoch, b + 1)
                    return {"hparams": hparams, "history": history, "stopped_at": [epoch, b + 1],
                            "texts_per_s": rate}
            train_s = time.perf_counter() - t_ep
            t1 = time.perf_counter()
            metrics = dev_metrics(predict(model, dev, device, bf16=bf16), dev, labels)
            row = {"epoch": epoch + 1, "train_loss": run_loss, "train_s": round(train_s, 1),
                   "texts_per_s": round(n_texts / train_s, 1), "dev_s": round(time.perf_counter() - t1, 1),
                   "dev": metrics}
            history.append(row)
            log.info("epoch %d done: %s", epoch + 1, json.dumps(row))
            start_batch = 0
            save(epoch + 1, 0, name=f"epoch-{epoch + 1}.pt")
            (out_dir / "history.json").write_text(json.dumps({"hparams": hparams, "history": history}, indent=1))
    return {"hparams": hparams, "history": history}


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_teacher(checkpoint: Path, out: Path, data_dir: Path = DATA_DIR, split: str = "train",
                  device: str = "auto", threads: int = 2, bf16: bool = False, batch_size: int = 64) -> dict:
    """Run a fine-tuned (teacher) checkpoint over a split once; save its probabilities per head
    (``.npz``, rows in file order) with the digest of the TSV they belong to."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    model, ck = load_checkpoint(checkpoint, device)
    hp = ck.get("hparams") or {}
    labels, ek_M, se_M = load_label_sets(data_dir)
    tsv = data_dir / f"{split}.tsv"
    tok = tokenizer(hp.get("max_length", 64), Path(hp["backbone"]) if hp.get("backbone") else None)
    rows = Split(tsv, tok, labels, ek_M, se_M, prefix=hp.get("prefix", ""))
    t0 = time.perf_counter()
    probs = predict(model, rows, device, batch_size, bf16)
    dt = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **probs, tsv_sha256=np.array(file_digest(tsv)), checkpoint=np.array(str(checkpoint)))
    res = {"rows": len(rows), "seconds": round(dt, 1), "out": str(out)}
    if split == "dev":
        res["dev"] = dev_metrics(probs, rows, labels)
    return res


def load_teacher(path: Path, tsv: Path) -> dict[str, np.ndarray]:
    """Teacher probabilities written by :func:`write_teacher` for exactly this TSV (rows in file order)."""
    data = np.load(path)
    if str(data["tsv_sha256"]) != file_digest(tsv):
        raise ValueError(f"{path} was computed for a different {tsv.name} (digest mismatch): run predict again")
    return {k: data[k].astype(np.float32) for k in ("go_emotions", "ekman", "sentiment")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="train.tsv, dev.tsv, labels.txt, *_mapping.json")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr-backbone", type=float, default=8e-5)
    ap.add_argument("--lr-heads", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.06, help="fraction of steps")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    ap.add_argument("--limit-train", type=int)
    ap.add_argument("--limit-dev", type=int)
    ap.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps: for timing")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--pos-weight-power", type=float, default=0.5,
                    help="class weighting of rare labels: BCE pos_weight = (neg/pos) ** P, 0 = off (0.5: dev go_emotions 0.521 -> 0.549)")
    ap.add_argument("--pos-weight-max", type=float, default=10.0, help="cap on that weight")
    ap.add_argument("--backbone", type=Path, help="HF folder of the pre-trained backbone (BERT or MPNet: "
                    "config.json, model.safetensors, tokenizer.json); default all-MiniLM-L6-v2 from its package")
    ap.add_argument("--prefix", default="", help='text put before every input (E5 models: "query: ")')
    ap.add_argument("--teacher", type=Path, help="teacher probabilities on train (.npz from `predict`): distil")
    ap.add_argument("--distill-weight", type=float, default=0.5, help="α: target = (1 − α)·gold + α·teacher")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs with AMX, GPUs)")
    ap.add_argument("--train-word-embeddings", action="store_true",
                    help="also train the word-embedding table (frozen by default)")
    ap.add_argument("--freeze-layers", type=int, default=0,
                    help="also keep all embeddings and the lowest N layers as pre-trained (multilingual backbones: "
                         "English data then cannot move what the other languages share there)")
    ap.add_argument("--translations", type=Path, nargs="+", default=(),
                    help="TSVs aligned row by row with train.tsv in other languages (translate_train): cross-lingual "
                         "copies with the English row's targets")
    ap.add_argument("--translation-share", type=float, default=0.5,
                    help="rows that also get a copy from one of --translations (picked at random, seeded)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = train(args.out, args.data_dir, args.epochs, args.batch_size, args.lr_backbone, args.lr_heads, args.warmup,
                args.max_length, args.seed, args.device, args.threads, args.resume, args.limit_train, args.limit_dev,
                args.save_every, args.max_steps, not args.no_progress, args.pos_weight_power, args.pos_weight_max,
                args.backbone, args.prefix, args.teacher, args.distill_weight, args.bf16,
                not args.train_word_embeddings, args.freeze_layers, args.translations, args.translation_share)
    print(json.dumps(res, indent=1), file=sys.stderr)
    return 0


def predict_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.finetune predict",
                                 description="Write a checkpoint's probabilities on a split (teacher targets).")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help=".npz file")
    ap.add_argument("--split", default="train", help="train or dev (a TSV of --data-dir)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(write_teacher(args.checkpoint, args.out, args.data_dir, args.split, args.device, args.threads,
                                   args.bf16), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
