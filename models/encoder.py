"""Tokenizer + ONNX backbone → pooled sentence embeddings.

On CPU the cost of a batch is its padded size, so :meth:`Encoder.embed` sorts texts by token
length and runs sub-batches whose padded size (longest × count) stays within a token budget,
then puts the rows back in input order. Where to cut the sorted run is chosen by
:func:`split_sorted`: the fewest padded tokens plus a fixed cost per session call. The
sub-batches of one batch run on ``streams`` threads at once (:func:`plan_streams`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .manifest import BackboneSpec

log = logging.getLogger(__name__)


GPU_PROVIDERS = ("CUDAExecutionProvider",)
_said: set[str] = set()


def resolve_providers(providers: Sequence[str]) -> list[str]:
    """``auto`` → CUDA when onnxruntime-gpu sees a GPU, else CPU; named providers that are missing
    are dropped with a warning. Always ends with the CPU provider as the last resort."""
    available = ort.get_available_providers()
    wanted = list(providers) or ["auto"]
    if "auto" in wanted:
        i = wanted.index("auto")
        wanted[i:i + 1] = [p for p in GPU_PROVIDERS if p in available] or ["CPUExecutionProvider"]
        if not any(p in available for p in GPU_PROVIDERS) and "auto" not in _said:
            _said.add("auto")
            log.info("execution provider: CPU (no CUDA in onnxruntime %s; install onnxruntime-gpu on a GPU "
                     "machine to use one)", ort.__version__)
    chosen = [p for p in dict.fromkeys(wanted) if p in available]
    missing = [p for p in wanted if p not in available]
    if missing and tuple(missing) not in _said:
        _said.add(tuple(missing))
        log.warning("execution providers %s not available (have %s); falling back to %s", missing, available,
                    chosen or ["CPUExecutionProvider"])
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def make_session(path, threads: int = 0, providers: Sequence[str] = ("auto",),
                 spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session on the best provider asked for, saying so when it falls back.

    Spinning is off by default: idle intra-op threads that spin take CPU from the worker's own
    event loop (consuming, publishing) on small machines.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = resolve_providers(providers)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    active = session.get_providers()
    if chosen[0] != active[0]:
        log.warning("%s could not start (%s); running on %s", chosen[0], path, active[0])
    return session


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity; a container's CPU quota is not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def plan_streams(streams: int, threads: int, provider: str, cores: int | None = None) -> tuple[int, int]:
    """(concurrent session calls, intra-op threads per call) for the settings' 0 = auto.

    On CPU, auto is one single-threaded call per core: measured on 2 cores with the INT8 MiniLM,
    two concurrent 1-thread calls did 430–515 texts/s where one 2-thread call did 275–440 — a
    multi-threaded call waits at every operator for its slowest thread, and on a small machine
    that thread shares its core with the event loop and the broker client. A GPU runs one stream.
    """
    cores = cores or cpu_cores()
    cpu = provider == "CPUExecutionProvider"
    if streams <= 0:
        streams = cores if cpu else 1
    if threads <= 0 and cpu:
        # Never ONNX Runtime's own default here: it starts one thread per *physical* core of the
        # machine and pins each to its core, escaping taskset / cpuset limits.
        threads = max(1, cores // streams)
    return streams, threads


def spread(runs: list[tuple[int, int]], lengths: np.ndarray, streams: int) -> list[tuple[int, int]]:
    """With several streams, halve the costliest runs until every stream has one (small batches at
    low rates would otherwise run on one core while the others idle), costliest first."""
    runs = list(runs)
    cost = lambda r: int(lengths[r[1] - 1]) * (r[1] - r[0])  # noqa: E731 - sorted: the last is the longest
    while len(runs) < streams:
        big = max((r for r in runs if r[1] - r[0] > 1), key=cost, default=None)
        if big is None:
            break
        mid = (big[0] + big[1]) // 2
        i = runs.index(big)
        runs[i:i + 1] = [(big[0], mid), (mid, big[1])]
    return sorted(runs, key=cost, reverse=True)


def pool(hidden: np.ndarray, mask: np.ndarray, how: str, normalize: bool) -> np.ndarray:
    """Mean over unmasked tokens, or the first ([CLS]) token; optional L2 normalisation."""
    if how == "cls":
        out = hidden[:, 0, :]
    elif how == "mean":
        m = mask[:, :, None].astype(hidden.dtype)
        out = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    else:
        raise ValueError(f"unknown pooling {how!r}")
    out = out.astype(np.float32, copy=False)
    if normalize:
        out = out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
    return out


# One extra session call costs about as much as this many padded tokens (INT8 MiniLM, 2 threads:
# ~2.4 ms per call vs ~0.12 ms per token, fitted to `emostream bench` raw-model rows).
CALL_COST_TOKENS = 20


def split_sorted(lengths: np.ndarray, max_tokens: int, call_cost: float = CALL_COST_TOKENS) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into runs [i, j) minimising Σ(longest × count) + call_cost × runs.

    A run's padded size stays ≤ ``max_tokens`` (a text longer than that runs alone). Dynamic
    programming over cut points, vectorised per end point: O(n × run length), ~1 ms for 256 texts.
    Greedy filling (grow a run until the budget is hit) pads far more: on GoEmotions dev, batches
    of 64, budget 512, greedy computes 1.26× the real tokens and this 1.08×.
    """
    n = len(lengths)
    lengths = np.asarray(lengths, dtype=np.float64)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        widest = max(1, int(max_tokens // longest)) if longest > 0 else j
        i = np.arange(max(0, j - widest), j)
        cost = best[i] + longest * (j - i) + call_cost
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], i[k]
    runs = []
    j = n
    while j > 0:
        runs.append((int(start[j]), j))
        j = int(start[j])
    return runs[::-1]


@dataclass
class Encoded:
    embeddings: np.ndarray  # [n, dim] float32
    tokens: int  # real (unpadded) tokens
    padded_tokens: int  # what the model actually computed
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other graph outputs (fused heads), [n, ...]


class Encoder:
    """One backbone: tokenization and the ONNX pass, nothing about emotions."""

    def __init__(self, spec: BackboneSpec, threads: int = 0, providers: Sequence[str] = ("auto",),
                 spinning: bool = False, extra_outputs: Sequence[str] = (), streams: int = 1,
                 cache_dir: str | os.PathLike | None = None):
        """``cache_dir``: where an assembled backbone is built on first load (:mod:`.assembly`)."""
        from .assembly import materialize

        spec = materialize(spec, cache_dir)
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(spec.tokenizer))
        # tokenizer.json files often fix padding/truncation (MiniLM's: 128); we pad per sub-batch.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=spec.max_length)
        self.streams, self.threads = plan_streams(streams, threads, resolve_providers(providers)[0])
        self.session = make_session(spec.onnx, self.threads, providers, spinning)
        # ONNX Runtime releases the GIL in run() and a session may be run from several threads at once.
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="emostream-stream") \
            if self.streams > 1 else None
        log.info("inference: %d concurrent session call(s) × %s intra-op thread(s) on %s", self.streams,
                 self.threads or "default", self.session.get_providers()[0])
        self.input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = spec.output if spec.output in outputs else outputs[0]
        missing = [o for o in extra_outputs if o not in outputs]
        if missing:
            raise ValueError(f"backbone {spec.onnx} has no output(s) {missing}; it has {outputs}")
        self.extra_outputs = list(extra_outputs)
        shape = self.session.get_outputs()[outputs.index(self.output_name)].shape
        self.dim = shape[-1] if isinstance(shape[-1], int) else None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        prefix = self.spec.prefix
        return [e.ids for e in self.tokenizer.encode_batch([prefix + t for t in texts] if prefix else list(texts))]

    def _run(self, ids: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        n, width = len(ids), max(len(x) for x in ids)
        input_ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:  # only what the graph declares
            feed["token_type_ids"] = np.zeros_like(input_ids)
        hidden, *extra = self.session.run([self.output_name, *self.extra_outputs], feed)
        if hidden.ndim == 2:  # graph already pooled
            return hidden.astype(np.float32, copy=False), extra
        return pool(hidden, mask, self.spec.pooling, self.spec.normalize), extra

    def run_chunks(self, chunks: Sequence[list[list[int]]]) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """``_run`` over each chunk of token ids, in order; on the streams at once when there are several."""
        if self._pool is not None and len(chunks) > 1:
            return self._pool.map(self._run, chunks)
        return map(self._run, chunks)

    def embed(self, texts: Sequence[str], max_tokens: int = 4096) -> Encoded:
        """Embeddings in input order, computed in length-sorted sub-batches of ≤ max_tokens padded tokens."""
        if not texts:
            return Encoded(np.zeros((0, self.dim or 0), dtype=np.float32), 0, 0,
                           {o: np.zeros((0, 0), dtype=np.float32) for o in self.extra_outputs})
        ids = self.tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        out: np.ndarray | None = None
        extra: list[np.ndarray] = []
        padded = 0
        sorted_lengths = lengths[order]
        runs = split_sorted(sorted_lengths, max_tokens)
        if self._pool is not None:
            runs = spread(runs, sorted_lengths, self.streams)
        chunks = [order[start:end] for start, end in runs]
        for chunk, (emb, more) in zip(chunks, self.run_chunks([[ids[i] for i in chunk] for chunk in chunks])):
            if out is None:
                out = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
                extra = [np.empty((len(ids), *m.shape[1:]), dtype=np.float32) for m in more]
            out[chunk] = emb
            for whole, part in zip(extra, more):
                whole[chunk] = part
            padded += int(lengths[chunk].max()) * len(chunk)
        assert out is not None
        return Encoded(out, int(lengths.sum()), padded, dict(zip(self.extra_outputs, extra)))
