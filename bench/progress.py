"""Progress bars of a bench run on stderr (rich), or nothing (tests)."""

from __future__ import annotations


class Progress:
    """rich.progress bars, or nothing (tests)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), console=Console(stderr=True))
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
            self._p = None

    def task(self, description: str, total: float | None):
        return self._p.add_task(description, total=total) if self._p is not None else None

    def update(self, task, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None) -> None:
        if self._p is not None and task is not None:
            kw = {k: v for k, v in (("advance", advance), ("completed", completed), ("total", total)) if v is not None}
            self._p.update(task, **kw)

    def log(self, message: str) -> None:
        if self._p is not None:
            self._p.console.print(message)
