"""Progress display: a rich bar on a terminal; nothing here otherwise (the loop logs plain lines)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, enabled: bool, desc: str = "train") -> None:
        self.enabled = enabled
        self._bar = None
        if enabled:
            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._task = self._bar.add_task(desc, total=total)
            self._bar.start()

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
