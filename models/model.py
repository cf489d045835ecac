"""An emotion model: one backbone pass shared by every head of a manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .encoder import Encoder
from .heads import Head, HeadOutput
from .manifest import Manifest, find_manifest


@dataclass(frozen=True)
class Prediction:
    embeddings: np.ndarray  # [n, dim]
    heads: dict[str, HeadOutput]
    tokens: int
    padded_tokens: int


class EmotionModel:
    def __init__(self, manifest: Manifest, threads: int = 0, providers: Sequence[str] = ("auto",),
                 encoder: Encoder | None = None, spinning: bool = False, streams: int = 1,
                 cache_dir: str | None = None):
        self.manifest = manifest
        self.threads = threads
        self.streams = streams
        self.providers = tuple(providers)
        self.spinning = spinning
        self.cache_dir = cache_dir
        fused = [h.output for h in manifest.heads if h.format == "fused"]
        self.encoder = encoder or Encoder(manifest.backbone, threads, providers, spinning, extra_outputs=fused,
                                          streams=streams, cache_dir=cache_dir)
        self.heads = [Head(spec, threads=1, providers=providers) for spec in manifest.heads]
        self._bb_mtime = manifest.backbone.onnx.stat().st_mtime_ns

    @classmethod
    def load(cls, name_or_path: str, threads: int = 0, providers: Sequence[str] = ("auto",),
             spinning: bool = False, streams: int = 1, cache_dir: str | None = None) -> "EmotionModel":
        """``streams``: concurrent session calls (0 = auto, see encoder.plan_streams); ``cache_dir``: where
        an assembled backbone is built on first load (default ``assembly.DEFAULT_CACHE_DIR``)."""
        return cls(find_manifest(name_or_path), threads, providers, spinning=spinning, streams=streams,
                   cache_dir=cache_dir)

    def reloaded(self, name_or_path: str) -> "EmotionModel":
        """The manifest read again; the backbone session is kept when its spec and file are unchanged."""
        manifest = find_manifest(name_or_path)
        same = manifest.backbone == self.manifest.backbone and \
            manifest.backbone.onnx.stat().st_mtime_ns == self._bb_mtime and \
            [h.output for h in manifest.heads if h.format == "fused"] == self.encoder.extra_outputs
        return EmotionModel(manifest, self.threads, self.providers, encoder=self.encoder if same else None,
                            spinning=self.spinning, streams=self.streams, cache_dir=self.cache_dir)

    @property
    def info(self) -> dict:
        """What output records carry as ``model``."""
        bb = self.manifest.backbone
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "backbone": {"name": bb.name, "version": bb.version},
            "heads": {h.name: h.version for h in self.heads},
        }

    def predict(self, texts: Sequence[str], max_tokens: int = 4096) -> Prediction:
        enc = self.encoder.embed(texts, max_tokens=max_tokens)
        heads = {h.name: h.from_encoded(enc) for h in self.heads}
        return Prediction(enc.embeddings, heads, enc.tokens, enc.padded_tokens)
