"""Emotion heads: pooled embedding → per-label probabilities → labels (pure numpy after ONNX).

The seed card's head layout is kept exactly, so a head file from elsewhere drops in: an ONNX
graph with one float32 input named ``logits`` of shape [n, dim] and one output per label, each
[n, 2] = [p_negative, p_positive]; ``thresholds.json`` maps label → threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .encoder import make_session
from .manifest import HeadSpec


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class HeadOutput:
    """Vectorised result for a batch: probabilities, the at-or-over-threshold mask and the argmax."""

    probs: np.ndarray  # [n, L] float32
    selected: np.ndarray  # [n, L] bool
    top: np.ndarray  # [n] int


class Head:
    def __init__(self, spec: HeadSpec, threads: int = 0, providers: Sequence[str] = ("auto",)):
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.session = None
        self.input_name, self.output_names = "", []
        if spec.format != "fused":  # a fused head's scores come out of the backbone's own pass
            self.session = make_session(spec.onnx, threads, providers)
            inputs = self.session.get_inputs()
            if len(inputs) != 1:
                raise ValueError(f"head {spec.name}: expected one input, got {[i.name for i in inputs]}")
            self.input_name = inputs[0].name
            self.output_names = [o.name for o in self.session.get_outputs()]
        self.labels = self._load_labels()
        self.thresholds = self._load_thresholds()

    def _load_labels(self) -> list[str]:
        if self.spec.labels is not None:
            data = json.loads(self.spec.labels.read_text())
            labels = data["labels"] if isinstance(data, dict) else data
        elif self.spec.format == "per_label":
            labels = list(self.output_names)  # the seed layout names each output after its label
        else:
            raise ValueError(f"head {self.name}: a matrix head needs a labels file")
        if self.spec.format == "per_label" and len(labels) != len(self.output_names):
            raise ValueError(f"head {self.name}: {len(labels)} labels but {len(self.output_names)} outputs")
        return [str(x) for x in labels]

    def _load_thresholds(self) -> np.ndarray:
        thr = np.full(len(self.labels), self.spec.default_threshold, dtype=np.float32)
        if self.spec.thresholds is not None:
            data = json.loads(self.spec.thresholds.read_text())
            for i, label in enumerate(self.labels):
                if label in data:
                    thr[i] = float(data[label])
        return thr

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Scores from the pooled embedding — or, for a fused head, from its backbone output."""
        if self.session is None:
            outs = [x]
        else:
            outs = self.session.run(None, {self.input_name: x.astype(np.float32, copy=False)})
        if self.spec.format == "per_label":
            # Outputs follow output_names order; labels file (if any) lists them in that order.
            probs = np.stack([o[:, 1] for o in outs], axis=1)
        else:
            probs = outs[0]
            if self.spec.activation == "sigmoid":
                probs = _sigmoid(probs)
            elif self.spec.activation == "softmax":
                probs = _softmax(probs)
        return probs.astype(np.float32, copy=False)

    def decide(self, probs: np.ndarray) -> HeadOutput:
        """Labels at or over threshold (multi-label) or just the argmax (single-label)."""
        top = probs.argmax(axis=1)
        if self.spec.kind == "single_label":
            selected = np.zeros_like(probs, dtype=bool)
            selected[np.arange(len(top)), top] = True
        else:
            selected = probs >= self.thresholds[None, :]
        return HeadOutput(probs, selected, top)

    def __call__(self, embeddings: np.ndarray) -> HeadOutput:
        return self.decide(self.probabilities(embeddings))

    def from_encoded(self, enc) -> HeadOutput:
        """This head's output for an :class:`~emostream.models.encoder.Encoded` batch."""
        if self.spec.format == "fused":
            return self.decide(self.probabilities(enc.extra[self.spec.output]))
        return self(enc.embeddings)
