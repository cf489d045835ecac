"""Reloading heads and thresholds without a restart: on SIGHUP or when a model file changes.

The reloader only decides *whether* and builds the new model; app.py swaps it on the inference
thread between batches, so the model versions in output records change at a batch boundary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from emostream.models.manifest import Manifest, ManifestError, find_manifest
from emostream.models.model import EmotionModel

log = logging.getLogger("emostream.worker")


def model_files(manifest: Manifest) -> list[Path]:
    files = [manifest.path, manifest.backbone.onnx]
    if manifest.backbone.tokenizer is not None:  # an assembled backbone's comes from its cache entry
        files.append(manifest.backbone.tokenizer)
    for h in manifest.heads:
        files += [p for p in (h.onnx, h.labels, h.thresholds) if p is not None]
    return files


def _stamp(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


class Reloader:
    def __init__(self, model: EmotionModel, name_or_path: str, poll_s: float, rules_check=None,
                 wrap=None, clock=time.monotonic):
        self.model = model
        self.wrap = wrap or (lambda m: m)  # e.g. fault injection around every model in use
        self.name_or_path = name_or_path
        self.poll_s = poll_s
        self.rules_check = rules_check  # callable(model) raising ValueError when alert rules no longer fit
        self.clock = clock
        self._stamp = _stamp(model_files(model.manifest))
        self._requested: str | None = None
        self._next_poll = clock() + poll_s if poll_s else float("inf")

    def request(self, why: str) -> None:
        log.warning("model reload requested (%s)", why)
        self._requested = why

    def due(self) -> bool:
        """True when a reload was asked for, or the files changed since the last load."""
        if self._requested:
            return True
        now = self.clock()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        try:
            stamp = _stamp(model_files(find_manifest(self.name_or_path)))
        except ManifestError as exc:
            log.error("model files changed but the manifest is not loadable yet: %s", exc)
            return False
        if stamp != self._stamp:
            self.request("model files changed")
            return True
        return False

    def load(self) -> EmotionModel | None:
        """Build the new model (reusing the backbone when unchanged); None keeps the current one."""
        why, self._requested = self._requested, None
        try:
            new = self.model.reloaded(self.name_or_path)
            if self.rules_check is not None:
                self.rules_check(new)
        except Exception as exc:  # noqa: BLE001 - a bad file must never take the worker down
            log.error("model reload (%s) failed, keeping %s: %r", why, self.model.info, exc)
            self._stamp = _stamp(model_files(self.model.manifest))
            return None
        self._stamp = _stamp(model_files(new.manifest))
        self.model = new
        return self.wrap(new)
