"""`emostream eval`: per-label and averaged P/R/F1 of a head on labelled data (fast, no torch)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emostream.models.evaluate import evaluate, gold_labels, plot, report
from emostream.models.training.data import EKMAN_LABELS, SENTIMENT_LABELS

FIXTURE = Path(__file__).parent / "fixtures" / "go_emotions_small" / "dev.tsv"
KEYS = {"head", "n", "macro", "weighted", "fixed_0_5", "per_label"}
PRF = {"precision", "recall", "f1"}
PER_LABEL = {"f1", "precision", "recall", "support", "threshold"}


def _check(rep: dict, n_labels: int) -> None:
    assert set(rep) == KEYS
    assert set(rep["macro"]) == PRF and set(rep["weighted"]) == PRF
    assert set(rep["fixed_0_5"]) == {"macro"} and set(rep["fixed_0_5"]["macro"]) == PRF
    assert len(rep["per_label"]) == n_labels
    assert all(set(d) == PER_LABEL for d in rep["per_label"].values())
    f1s = [d["f1"] for d in rep["per_label"].values()]
    assert rep["macro"]["f1"] == pytest.approx(np.mean(f1s), abs=1e-3)  # per-label values are rounded to 4 places


def test_cli_eval_json_keys_macro_and_plot(tmp_path):
    png = tmp_path / "f1.png"
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "eval", "--data", str(FIXTURE),
                        "--model", "minilm-go-emotions", "--json", "--plot", str(png)],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    rep = json.loads(p.stdout)
    _check(rep, 28)
    assert rep["head"] == "go_emotions" and rep["n"] == 150
    assert sum(d["support"] for d in rep["per_label"].values()) > 0
    assert all(isinstance(d["threshold"], float) for d in rep["per_label"].values())
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_default_head_and_unknown_head():
    rep = evaluate(FIXTURE, model="minilm-go-emotions")
    _check(rep, 28)
    assert 0.2 < rep["macro"]["f1"] <= 1.0
    with pytest.raises(ValueError, match="no head"):
        evaluate(FIXTURE, head="ekman", model="minilm-go-emotions")


def test_gold_labels_for_derived_heads():
    from emostream.models.linear_head import GO_EMOTIONS_LABELS

    go = list(GO_EMOTIONS_LABELS)
    y = np.zeros((3, 28), dtype=np.uint8)
    y[0, [go.index("anger"), go.index("joy")]] = 1  # tie negative vs positive → negative
    y[1, [go.index("joy"), go.index("love"), go.index("anger")]] = 1  # 2 positive vs 1 negative
    y[2, go.index("neutral")] = 1
    ek = gold_labels(list(EKMAN_LABELS), y, FIXTURE.parent)
    assert ek[0].tolist() == [1, 0, 0, 1, 0, 0, 0] and ek[2].tolist() == [0, 0, 0, 0, 0, 0, 1]
    se = gold_labels(list(SENTIMENT_LABELS), y, FIXTURE.parent)
    assert [SENTIMENT_LABELS[i] for i in se.argmax(1)] == ["negative", "positive", "neutral"]
    assert (se.sum(1) == 1).all()
    # Columns follow the head's label order, whatever it is.
    rev = gold_labels(list(reversed(SENTIMENT_LABELS)), y, FIXTURE.parent)
    assert (rev == se[:, ::-1]).all()


def test_single_label_report_uses_argmax_and_plots(tmp_path):
    probs = np.array([[0.6, 0.2, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]], dtype=np.float32)
    gold = np.eye(4, dtype=np.uint8)[[0, 1, 2]]
    rep = report(probs, gold, list(SENTIMENT_LABELS), np.full(4, 0.5), True, "sentiment")
    _check(rep, 4)
    assert rep["per_label"]["positive"]["f1"] == 1.0 and rep["per_label"]["negative"]["f1"] == 1.0
    assert rep["per_label"]["positive"]["threshold"] is None
    # At a fixed 0.5 the 0.4 'negative' row is missed.
    assert rep["fixed_0_5"]["macro"]["recall"] < rep["macro"]["recall"]
    assert plot(rep, tmp_path / "x.png").stat().st_size > 1000


CHECK_SET = Path(__file__).parents[1] / "models" / "eval" / "multilingual_check.tsv"


def test_cli_eval_check_set_per_language():
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "eval", "--data", str(CHECK_SET),
                        "--format", "check", "--model", "minilm-ft-emotions", "--json"],
                       capture_output=True, timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    rep = json.loads(p.stdout)
    assert rep["heads"] == ["ekman", "sentiment"]
    langs = rep["by_language"]
    assert list(langs) == ["en", "es", "de", "fr", "pt", "it", "all but en"]
    assert all(langs[l]["n"] == 42 for l in ("en", "es", "de", "fr", "pt", "it")) and langs["all but en"]["n"] == 210
    rows = rep["rows"]
    for head in ("ekman", "sentiment"):
        en = [r for r in rows if r["language"] == "en"]
        assert langs["en"][head] == pytest.approx(np.mean([r[head]["top"] == r[head]["gold"] for r in en]), abs=1e-4)
    assert langs["en"]["ekman"] >= 0.8  # the English-only default model reads English
    assert langs["en"]["ekman_same_as_en"] is None
    es = {r["id"]: r["ekman"]["top"] for r in rows if r["language"] == "es"}
    same = np.mean([es[r["id"]] == r["ekman"]["top"] for r in rows if r["language"] == "en"])
    assert langs["es"]["ekman_same_as_en"] == pytest.approx(same, abs=1e-4)


def test_cli_eval_check_set_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tekman\nhello\tjoy\n")
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "eval", "--data", str(bad), "--format", "check",
                        "--model", "minilm-ft-emotions"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "needs a header" in p.stderr and p.stderr.count("\n") == 1
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("id\tlanguage\tekman\ttext\n1\ten\tcontempt\tugh\n")
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "eval", "--data", str(unknown), "--format",
                        "check", "--model", "minilm-ft-emotions"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "contempt" in p.stderr
