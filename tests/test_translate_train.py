"""Other-language copies of the training split (translate_train) and how fine-tuning takes them.

The dictionary parser and code-switching need nothing installed; the apertium wrapper runs against a
stand-in ``apertium`` on PATH (the real one is a Debian package, training-time only); the Split
test needs torch (the ``train`` extra).
"""

import gzip
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest

from emostream.models.training.translate_train import apertium, codeswitch, main, read_dictd

FIXTURES = Path(__file__).parent / "fixtures" / "go_emotions_small"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    s = ""
    while True:
        s = _B64[n % 64] + s
        n //= 64
        if not n:
            return s


def _dictd(tmp_path: Path, entries: dict[str, str]) -> Path:
    """A FreeDict-style dictd database: ``headword /pron/`` line, then translation lines."""
    body, index = b"", ["00databaseinfo\tA\tB"]
    for head, text in entries.items():
        chunk = f"{head} /x/\n{text}\n".encode()
        index.append(f"{head}\t{_b64(len(body))}\t{_b64(len(chunk))}")
        body += chunk
    prefix = tmp_path / "eng-xxx"
    (tmp_path / "eng-xxx.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    (tmp_path / "eng-xxx.dict.dz").write_bytes(gzip.compress(body))
    return prefix


def test_dictd_keeps_short_translations_and_drops_notes(tmp_path):
    prefix = _dictd(tmp_path, {"angry": "1. wütend, zornig (adj)\n2. böse", "house": "Haus\nNote: neuter",
                               "a lot": "viel", "gross": "eklig, [coll] widerlich, ein sehr langer Ausdruck hier"})
    table = read_dictd(prefix)
    assert table["angry"] == ["wütend", "zornig", "böse"]
    assert table["house"] == ["Haus"]
    assert table["gross"] == ["eklig"]
    assert "a lot" not in table  # multi-word headwords cannot match a single token


def test_codeswitch_swaps_known_words_at_the_rate(tmp_path):
    table = {"angry": ["wütend"], "house": ["Haus"], "the": ["das"], "am": ["bin"]}
    text = "I am so ANGRY about the house."
    assert codeswitch(text, table, 0.0, random.Random(1)) == text
    # rate 1: every known word of three letters or more; "am" (two letters) stays
    assert codeswitch(text, table, 1.0, random.Random(1)) == "I am so wütend about das Haus."
    swapped = [codeswitch("house " * 200, table, 0.5, random.Random(s)).split().count("Haus") for s in range(3)]
    assert all(60 < n < 140 for n in swapped)


def _fake_apertium(tmp_path: Path, script: str, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "apertium"
    exe.write_text("#!/usr/bin/env python3\nimport sys\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_apertium_keeps_rows_aligned_and_refuses_a_merged_line(tmp_path, monkeypatch):
    _fake_apertium(tmp_path, "for line in sys.stdin: print(line.rstrip('\\n').upper())\n", monkeypatch)
    assert apertium(["so happy", "two\nlines", "x"], "eng-spa") == ["SO HAPPY", "TWO LINES", "X"]
    out = tmp_path / "es.tsv"
    assert main(["apertium", "--pair", "eng-spa", "--train", str(FIXTURES / "train.tsv"), "--out", str(out)]) == 0
    src = (FIXTURES / "train.tsv").read_text(encoding="utf-8").splitlines()
    got = out.read_text(encoding="utf-8").splitlines()
    assert len(got) == len(src)
    assert all(g.split("\t")[1:] == s.split("\t")[1:] for g, s in zip(got, src))  # labels and ids untouched
    assert got[0].split("\t")[0] == src[0].split("\t")[0].upper()

    (tmp_path / "bin" / "apertium").write_text("#!/usr/bin/env python3\nimport sys\nprint(sys.stdin.read()"
                                               ".replace('\\n', ' '))\n")
    with pytest.raises(SystemExit, match="3 lines in, 1 out"):
        apertium(["a", "b", "c"], "eng-spa")


def test_translated_copies_carry_the_english_rows_targets(tmp_path):
    pytest.importorskip("torch")
    from emostream.models.training.finetune import Split, tokenizer

    from emostream.models.training.data import load_label_sets

    src = (FIXTURES / "train.tsv").read_text(encoding="utf-8").splitlines()
    copy = tmp_path / "xx.tsv"
    copy.write_text("\n".join("COPY " + line for line in src) + "\n", encoding="utf-8")
    labels, ek, se = load_label_sets(FIXTURES)
    tok = tokenizer(64)
    split = Split(FIXTURES / "train.tsv", tok, labels, ek, se, limit=40)
    teacher = {"go_emotions": np.random.default_rng(0).random((40, 28), dtype=np.float32),
               "ekman": np.full((40, 7), 0.5, np.float32),
               "sentiment": np.full((40, 4), 0.25, np.float32)}
    split.distill(teacher, 0.5)
    added = split.add_translations([copy], 0.5, tok, "", seed=3)
    assert 5 < added < 35 and len(split) == 40 + added
    for j in range(40, len(split)):
        i = split.texts.index(split.texts[j][len("COPY "):])  # the English row it copies
        assert split.texts[j] == "COPY " + split.texts[i]
        np.testing.assert_array_equal(split.soft["go_emotions"][j], split.soft["go_emotions"][i])
        np.testing.assert_array_equal(split.go[j], split.go[i])

    shuffled = tmp_path / "bad.tsv"
    shuffled.write_text("\n".join(reversed(src)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not aligned"):
        Split(FIXTURES / "train.tsv", tok, labels, ek, se, limit=40).add_translations([shuffled], 0.5, tok, "", 3)
