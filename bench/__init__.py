"""``emostream bench``: throughput and latency from the raw model up to the worker behind a broker.

Not part of the worker (nothing in ``emostream.worker`` imports it); it needs the ``bench`` extra
(psutil, matplotlib). Modules, one job each: :mod:`.plan` (options, the plan of each stage, texts
and records), :mod:`.stages` (what each stage measures), :mod:`.load` (worker processes, load
generation, meters), :mod:`.broker` (the broker the broker stages run against), :mod:`.report`
(``bench.json``, ``bench.md``, plots), :mod:`.run` (one whole run) and :mod:`.naive_agent` (the
per-message baseline).
"""

from __future__ import annotations

import importlib

EXTRA_MODULES = ("psutil", "matplotlib")
INSTALL_HINT = "pip install 'emostream[bench]'"


def missing_extra() -> str | None:
    """The first module of the bench extra that cannot be imported, or None when all can."""
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None
