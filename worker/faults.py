"""Fault injection for tests and chaos drills (settings group "testing"; off by default)."""

from __future__ import annotations

from typing import Sequence


class InjectedFailure(RuntimeError):
    pass


class FailOnMarker:
    """Wraps a model: predicting a batch that holds a text containing ``marker`` raises.

    Exercises the pipeline's split-and-retry path end to end, as a real runtime failure on one
    record (an ONNX error, an out-of-memory on one huge input) would.
    """

    def __init__(self, model, marker: str):
        self.model = model
        self.marker = marker
        self.manifest = model.manifest
        self.heads = model.heads
        self.info = model.info

    def predict(self, texts: Sequence[str], max_tokens: int = 4096):
        if any(self.marker in t for t in texts):
            raise InjectedFailure(f"injected failure (text contains {self.marker!r})")
        return self.model.predict(texts, max_tokens=max_tokens)
