"""Fine-tune all-MiniLM-L6-v2 jointly with the go_emotions / ekman / sentiment heads.

    python -m emostream.models.training.finetune --out runs/ft --epochs 2

Loss: BCE(go_emotions, 28) + BCE(ekman, 7) + CE(sentiment, 4) with labels derived as in
:mod:`.data`. Mean pooling + L2 normalisation (what the worker computes), AdamW with separate
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

from ..linear_head import f1_report, read_goemotions, tune_thresholds
from .bert import Bert, EmotionNet, default_model_dir
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


class Split:
    """Token ids and the three target sets of one TSV."""

    def __init__(self, path: Path, tok, labels, ek_M, se_M, limit: int | None = None):
        texts, y = read_goemotions(path, len(labels))
        if limit:
            texts, y = texts[:limit], y[:limit]
        self.texts = texts
        self.ids = [e.ids for e in tok.encode_batch(texts)]
        self.lengths = [len(x) for x in self.ids]
        self.go = y.astype(np.float32)
        self.ekman = ekman_targets(y, ek_M).astype(np.float32)
        self.sentiment = sentiment_targets(y, se_M)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: Sequence[int], device):
        ids, mask = pad_batch([self.ids[i] for i in idx])
        t = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
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
    pw = pos_weight or {}
    parts = {
        "go_emotions": F.binary_cross_entropy_with_logits(out["go_emotions"], target["go_emotions"],
                                                          pos_weight=pw.get("go_emotions")),
        "ekman": F.binary_cross_entropy_with_logits(out["ekman"], target["ekman"], pos_weight=pw.get("ekman")),
        "sentiment": F.cross_entropy(out["sentiment"], target["sentiment"]),
    }
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def predict(model: EmotionNet, split: Split, device, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Probabilities per head (sigmoid / softmax) in split order."""
    model.eval()
    out = {k: np.zeros((len(split), m.out_features), dtype=np.float32) for k, m in model.heads.items()}
    for idx in bucket_batches(split.lengths, batch_size, shuffle=False):
        ids, mask, _ = split.batch(idx, device)
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
                     "macro_f1_at_0.5": f1_report(probs[name], y, 0.5)["macro"]["f1"]}
    onehot = np.eye(len(SENTIMENT_LABELS))[split.sentiment]
    pred = np.eye(len(SENTIMENT_LABELS))[probs["sentiment"].argmax(1)]
    res["sentiment"] = {"macro_f1_argmax": f1_report(pred, onehot, 0.5)["macro"]["f1"],
                        "accuracy": float((probs["sentiment"].argmax(1) == split.sentiment).mean())}
    return res


def build(device, dropout: float = 0.1) -> EmotionNet:
    return EmotionNet(Bert.from_pretrained(), {"go_emotions": 28, "ekman": len(EKMAN_LABELS),
                                              "sentiment": len(SENTIMENT_LABELS)}, dropout=dropout).to(device)


def optimizer_and_schedule(model: EmotionNet, lr_backbone: float, lr_heads: float, total_steps: int,
                           warmup: float, weight_decay: float = 0.01, freeze_word_embeddings: bool = True):
    # The 30522x384 word-embedding table is half the parameters; its dense gradient and AdamW
    # state cost CPU time for little gain, so by default it stays as pre-trained.
    model.backbone.word.weight.requires_grad_(not freeze_word_embeddings)
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
          pos_weight_max: float = 10.0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    set_seed(seed)
    labels, ek_M, se_M = load_label_sets(data_dir)
    tok = tokenizer(max_length)
    t0 = time.perf_counter()
    tr = Split(data_dir / "train.tsv", tok, labels, ek_M, se_M, limit_train)
    dev = Split(data_dir / "dev.tsv", tok, labels, ek_M, se_M, limit_dev)
    log.info("tokenized %d train / %d dev texts in %.1fs (mean %.1f tokens)", len(tr), len(dev),
             time.perf_counter() - t0, float(np.mean(tr.lengths)))
    model = build(device)
    pos_weight = {}
    for name, y in (("go_emotions", tr.go), ("ekman", tr.ekman)):
        w = pos_weights(np.asarray(y), pos_weight_power, pos_weight_max)
        if w is not None:
            pos_weight[name] = torch.as_tensor(w).to(device)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    total = steps_per_epoch * epochs
    opt, sched = optimizer_and_schedule(model, lr_backbone, lr_heads, total, warmup)
    hparams = dict(epochs=epochs, batch_size=batch_size, lr_backbone=lr_backbone, lr_heads=lr_heads,
                   warmup=warmup, max_length=max_length, seed=seed, weight_decay=0.01, dropout=0.1,
                   schedule="linear warmup + linear decay", n_train=len(tr), n_dev=len(dev),
                   pos_weight_power=pos_weight_power, pos_weight_max=pos_weight_max)
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
                loss, parts = loss_fn(model(ids, mask), target, pos_weight)
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
            metrics = dev_metrics(predict(model, dev, device), dev, labels)
            row = {"epoch": epoch + 1, "train_loss": run_loss, "train_s": round(train_s, 1),
                   "texts_per_s": round(n_texts / train_s, 1), "dev_s": round(time.perf_counter() - t1, 1),
                   "dev": metrics}
            history.append(row)
            log.info("epoch %d done: %s", epoch + 1, json.dumps(row))
            start_batch = 0
            save(epoch + 1, 0, name=f"epoch-{epoch + 1}.pt")
            (out_dir / "history.json").write_text(json.dumps({"hparams": hparams, "history": history}, indent=1))
    return {"hparams": hparams, "history": history}


def main(argv: Sequence[str] | None = None) -> int:
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = train(args.out, args.data_dir, args.epochs, args.batch_size, args.lr_backbone, args.lr_heads, args.warmup,
                args.max_length, args.seed, args.device, args.threads, args.resume, args.limit_train, args.limit_dev,
                args.save_every, args.max_steps, not args.no_progress, args.pos_weight_power, args.pos_weight_max)
    print(json.dumps(res, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
