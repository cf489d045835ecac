"""The one timestamp format of emostream's records and log lines: ISO 8601, UTC, milliseconds."""

from __future__ import annotations

from datetime import datetime, timezone


def iso_utc(epoch_s: float) -> str:
    """``1700000000.5`` → ``"2023-11-14T22:13:20.500+00:00"``."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="milliseconds")
