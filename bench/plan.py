"""What a bench run measures and on what: options, the plan of each stage, the texts and records.

:func:`make_plan` turns ``--quick`` / ``--n`` into a :class:`Plan`; :func:`load_texts` reads the
texts (GoEmotions dev by default); :func:`record` is the one JSON input record every stage sends.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import orjson

from emostream.worker.decode import RawMessage
from emostream.worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]  # the repository root
DEFAULT_DATA = Path("../shared/data/go_emotions/dev.tsv")  # relative to the repository root
ALL_STAGES = ("raw", "pipeline", "cache", "end_to_end", "naive", "scaling", "own_core")
IN_PROCESS_STAGES = ("raw", "pipeline", "cache")
BROKER_STAGES = ("end_to_end", "naive", "scaling", "own_core")
MULTI_THREADS = 2  # "intra-op threads 1 vs 2"


class BenchError(RuntimeError):
    """A benchmark that cannot run (missing data, a worker that died, outputs that never came)."""


# --------------------------------------------------------------------------------------------
# options and plan
@dataclass
class BenchOptions:
    data: Path | None = None  # None: ../shared/data/go_emotions/dev.tsv from the repository root
    out: Path = Path("bench-results")
    quick: bool = False
    n: int | None = None  # texts per stage (default 1000, quick 150)
    model: str | None = None  # manifest name or path (default: the settings' model)
    stages: Sequence[str] = ALL_STAGES
    progress: bool = True
    settings: Settings | None = None  # base settings (default: Settings.from_env())
    seed: int = 0
    engines: Sequence[str] = ("tansu",)  # broker stages run on each, in this order (tansu, kafka)


@dataclass(frozen=True)
class RawVariant:
    threads: int
    batch_size: int
    max_tokens: int
    order: str = "length-sorted"  # or "arrival"
    spinning: bool = False  # ONNX Runtime session.intra_op.allow_spinning (the worker's default: off)
    streams: int = 1  # session calls at once (each with `threads` intra-op threads)

    @property
    def label(self) -> str:
        extra = "" if self.order == "length-sorted" else ", arrival order"
        extra += ", spinning" if self.spinning else ""
        streams = f" × {self.streams} streams" if self.streams > 1 else ""
        return f"{self.threads} thr{streams}, batch {self.batch_size}, ≤{self.max_tokens} tok{extra}"


@dataclass(frozen=True)
class Plan:
    n: int
    raw_variants: tuple[RawVariant, ...]
    rounds: int = 2  # raw and pipeline variants run this many times, interleaved; each keeps its best
    duplicate_fraction: float = 0.2
    cache_size: int = 10_000
    open_loop_s: float = 15.0
    open_loop_min: int = 100
    flat_out_records: int = 3000  # records per flat-out run through the broker (the texts repeated)
    warmup: int = 64
    scaling: bool = True
    t_batch_repeats: int = 15
    token_budgets: tuple[int, ...] = (1024, 512, 256)  # pipeline sweep, besides the configured one
    fetch_wait_compare_ms: int | None = 1500  # an extra worker run at this consumer fetch wait (faust's own)
    publish_rtt_ms: int | None = 60  # the overlap lever: worker runs with publishes this much slower, overlap on/off
    window_sweep_ms: tuple[float, ...] = (100.0, 150.0)  # own-core stage: open loop again at these batch windows


def make_plan(quick: bool, n: int | None) -> Plan:
    T = MULTI_THREADS
    if quick:
        return Plan(
            n=n or 150,
            raw_variants=(RawVariant(T, 1, 4096), RawVariant(T, 64, 4096), RawVariant(1, 64, 4096),
                          RawVariant(1, 64, 512, streams=T)),
            rounds=1, cache_size=2_000, open_loop_s=4.0, open_loop_min=40, warmup=16, scaling=False, flat_out_records=0,
            t_batch_repeats=5, token_budgets=(512,), fetch_wait_compare_ms=None, publish_rtt_ms=None,
        )
    return Plan(
        n=n or 1000,
        raw_variants=(
            RawVariant(T, 1, 4096), RawVariant(T, 32, 4096), RawVariant(T, 64, 4096), RawVariant(T, 256, 16384),
            RawVariant(T, 64, 512), RawVariant(T, 64, 4096, "arrival"), RawVariant(T, 64, 4096, spinning=True),
            RawVariant(1, 64, 4096), RawVariant(1, 1, 4096),
            RawVariant(1, 32, 4096, streams=T), RawVariant(1, 64, 512, streams=T), RawVariant(1, 64, 4096, streams=T),
        ),
    )



# --------------------------------------------------------------------------------------------
# data
def default_data_path() -> Path:
    for base in (ROOT, Path.cwd()):
        path = (base / DEFAULT_DATA).resolve()
        if path.is_file():
            return path
    return (ROOT / DEFAULT_DATA).resolve()


def load_texts(path: Path, n: int | None = None) -> list[str]:
    """Texts of a GoEmotions TSV (``text<TAB>label ids<TAB>id``; first column) or of a plain file
    (one text per line). Blank lines are skipped; with ``n`` larger than the file, texts repeat."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"data file not found: {path} — pass --data FILE (a GoEmotions .tsv or one text per line)")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if path.suffix == ".tsv" or (lines and all(line.count("\t") == 2 for line in lines[:50])):
        texts = [line.split("\t", 1)[0] for line in lines]
    else:
        texts = lines
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BenchError(f"no texts in {path}")
    if n is not None:
        texts = (texts * (n // len(texts) + 1))[:n]
    return texts


def duplicate_stream(texts: Sequence[str], fraction: float, seed: int = 0, window: int = 500) -> list[str]:
    """``len(texts)`` texts where about ``fraction`` repeat one of the last ``window`` ones (reposts)."""
    rng = random.Random(seed)
    out: list[str] = []
    fresh = iter(texts)
    while len(out) < len(texts):
        if out and rng.random() < fraction:
            out.append(out[-1 - rng.randrange(min(window, len(out)))])
        else:
            out.append(next(fresh))
    return out


def repeat_fraction(texts: Sequence[str]) -> float:
    """Share of texts that already appeared earlier in the stream (what an unbounded cache could hit)."""
    seen: set[str] = set()
    repeats = 0
    for t in texts:
        repeats += t in seen
        seen.add(t)
    return repeats / len(texts) if texts else 0.0


def record(i: int, text: str, run: str, sent_at: float = 0.0) -> tuple[bytes, bytes]:
    """Key and value of input record ``i`` of a run; ``run`` and ``sent_at`` pass through to the
    output, where the bench's consumer reads them back."""
    rid = f"{run}-{i}"
    return rid.encode(), orjson.dumps({"id": rid, "text": text, "run": run, "sent_at": sent_at})


def raw_messages(texts: Sequence[str], run: str, partitions: int = 8) -> list[RawMessage]:
    """The records as the worker's consumer hands them over, for the in-process stages."""
    now = time.time()
    msgs = []
    for i, t in enumerate(texts):
        key, value = record(i, t, run, now)
        msgs.append(RawMessage(value, key, "bench", i % partitions, i // partitions, now))
    return msgs

