"""``emostream classify``: the pipeline over texts from the command line, no Kafka."""

from __future__ import annotations

import sys
import time
from itertools import islice
from typing import Iterable

from .decode import RawMessage
from .pipeline import Enricher
from .runner import load_model
from .settings import Settings


def classify_lines(settings: Settings, lines: Iterable[str], table: bool = False, chunk: int = 64) -> None:
    """Score texts in chunks and print one JSON record per text (or a table)."""
    settings = settings.model_copy(update={"input_format": "text", "include_text": True})
    enricher = Enricher(load_model(settings), settings)
    it = iter(lines)
    offset = 0
    rows = []
    while batch := list(islice(it, chunk)):
        now = time.time()
        msgs = [RawMessage(t.encode("utf-8", "surrogatepass"), None, "classify", 0, offset + i, now)
                for i, t in enumerate(batch)]
        offset += len(batch)
        result = enricher(msgs)
        # keep input order for outputs and rejects alike
        by_offset = {o.source.offset: o for o in result.outputs + result.dead_letters}
        for m in msgs:
            out = by_offset[m.offset]
            if table:
                rows.append(out)
            else:
                sys.stdout.buffer.write(out.value + b"\n")
        sys.stdout.flush()
    if table:
        _print_table(rows)


def _print_table(rows) -> None:
    import orjson
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False)
    t.add_column("text", overflow="fold", max_width=60)
    t.add_column("head")
    t.add_column("labels (score)")
    for out in rows:
        rec = orjson.loads(out.value)
        if "emotions" not in rec:
            t.add_row(repr(out.source.value[:60]), "-", f"[red]{rec['error']['code']}[/]")
            continue
        for name, res in rec["emotions"].items():
            shown = res["labels"] or [res["top"]]
            t.add_row(rec.get("text", ""), name, ", ".join(f"{l} ({res['scores'][l]:.2f})" for l in shown))
    Console().print(t)
