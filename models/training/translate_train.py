"""Other-language copies of the English training split, for ``finetune --translations``.

    python -m emostream.models.training.translate_train apertium --pair eng-spa --out runs/tt/es.tsv
    python -m emostream.models.training.translate_train codeswitch --dict /usr/share/dictd/freedict-eng-deu \\
        --out runs/tt/cs-deu.tsv

Both write a TSV aligned row by row with ``train.tsv`` (same labels and ids, text replaced), so the
English row's gold labels and teacher probabilities serve its copy: cross-lingual distillation.

* ``apertium`` — whole sentences through a rule-based MT pair installed from Debian
  (``apt-get install apertium apertium-eng-spa apertium-eng-cat apertium-en-gl``). Rough, but real
  sentences in the target language.
* ``codeswitch`` — each English word found in a FreeDict dictionary (``apt-get install
  dict-freedict-eng-deu``…) is replaced, with probability ``--rate``, by one of its translations
  (CoSDA-ML, Qin et al. 2020): noisy, but it reaches languages with no MT pair here.

Training-time tools only: the worker never needs them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .data import DATA_DIR

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_WORD = re.compile(r"[A-Za-z][A-Za-z'’]*")


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def read_dictd(prefix: str | Path) -> dict[str, list[str]]:
    """A dictd database (``X.index`` + ``X.dict.dz``, FreeDict's format) → headword → translations
    (short ones only: at most three words, no pronunciations, notes or cross-references)."""
    data = gzip.open(f"{prefix}.dict.dz").read()
    out: dict[str, list[str]] = {}
    for line in open(f"{prefix}.index", encoding="utf-8"):
        head, off, length = line.rstrip("\n").split("\t")[:3]
        if head.startswith("00database") or " " in head:
            continue
        body = data[_b64(off):_b64(off) + _b64(length)].decode("utf-8", "replace").split("\n")[1:]
        found = out.setdefault(head.lower(), [])
        for sense in body:
            sense = sense.strip()
            if not sense or sense.startswith(("Note", "Synonym", "See also", '"')):
                continue
            sense = re.sub(r"\([^)]*\)|<[^>]*>|^\d+\.\s*", "", sense)
            for t in sense.split(","):
                t = t.strip(" ;.")
                if t and len(t.split()) <= 3 and not re.search(r"[\[\]{}=/…]", t) and t not in found:
                    found.append(t)
    return {k: v for k, v in out.items() if v}


def codeswitch(text: str, table: dict[str, list[str]], rate: float, rng: random.Random) -> str:
    """Replace dictionary words (three letters or more) with one of their first three translations
    (a dictionary lists the common sense first), each with probability ``rate``."""
    def swap(m: re.Match) -> str:
        options = table.get(m.group(0).lower()) if len(m.group(0)) >= 3 else None
        return rng.choice(options[:3]) if options and rng.random() < rate else m.group(0)

    return _WORD.sub(swap, text)


def apertium(texts: Sequence[str], pair: str) -> list[str]:
    """Translate one text per line with ``apertium -u PAIR``; checks that no line was merged or split."""
    if shutil.which("apertium") is None:
        raise SystemExit("apertium is not installed: apt-get install apertium apertium-" + pair)
    clean = [t.replace("\n", " ") for t in texts]
    out = subprocess.run(["apertium", "-u", pair], input="\n".join(clean) + "\n", capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if out and out[-1] == "":
        out.pop()
    if len(out) != len(texts):
        raise SystemExit(f"apertium {pair}: {len(texts)} lines in, {len(out)} out")
    return [" ".join(t.split()) or src for t, src in zip(out, texts)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.translate_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=("apertium", "codeswitch"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=Path, default=DATA_DIR / "train.tsv")
    ap.add_argument("--pair", help="apertium: the mode, e.g. eng-spa, eng-cat, en-gl")
    ap.add_argument("--dict", help="codeswitch: dictd path without extension")
    ap.add_argument("--rate", type=float, default=0.6, help="codeswitch: share of known words replaced")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args(argv)
    rows = [line.rstrip("\r\n").split("\t") for line in open(args.train, encoding="utf-8", newline="")
            if line.strip()]
    texts = [r[0] for r in rows]
    if args.method == "apertium":
        if not args.pair:
            ap.error("apertium needs --pair")
        new = apertium(texts, args.pair)
    else:
        if not args.dict:
            ap.error("codeswitch needs --dict")
        table, rng = read_dictd(args.dict), random.Random(args.seed)
        new = [codeswitch(t, table, args.rate, rng) for t in texts]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r, t in zip(rows, new):
            fh.write("\t".join([t.replace("\t", " ")] + r[1:]) + "\n")
    tmp.replace(args.out)
    changed = sum(a != b for a, b in zip(texts, new))
    print(f"{args.out}: {len(new)} rows, {changed} changed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
