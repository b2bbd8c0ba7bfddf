"""Training progress: a rich bar on a terminal, and the current rate for the plain log lines otherwise.

What a user watches for hours, so the numbers must not mislead: the examples/s shown is the CURRENT rate
(a whole-run average hides a slow-down for hours), the ETA comes from a long window (rich's default 30 s
estimate jumps at every evaluation pause), and a bar never outlives its run: `bars_closed()` stops any bar
still drawn before the CLI prints why a run stopped, so that line is not overdrawn and the cursor is back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections import deque
from collections.abc import Iterator
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

RATE_WINDOW_S = 10.0  # training seconds behind the bar's examples/s
ETA_WINDOW_S = 300.0  # wall seconds behind the ETA (evaluation pauses included: they are part of the wait)
_open: weakref.WeakSet[Progress] = weakref.WeakSet()


class Progress:
    """One training run's progress. `enabled` = draw a bar (a terminal); else only `window_rate` is used.

    `completed`, `examples` and `train_s` are where a resumed run starts, so the first rate and the ETA
    are not inflated by the steps done before the resume.
    """

    def __init__(self, total: int, enabled: bool, desc: str = "train", completed: int = 0, examples: int = 0,
                 train_s: float = 0.0) -> None:
        self.enabled = enabled
        self._mark = (examples, train_s)  # start of the current logging window
        self._recent: deque[tuple[int, float]] = deque([(examples, train_s)], maxlen=1000)
        self._bar: RichProgress | None = None
        self._streams: list[tuple[logging.StreamHandler, object]] = []
        if enabled:
            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} ex/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                speed_estimate_period=ETA_WINDOW_S, transient=False,
            )
            self._task = self._bar.add_task(desc, total=total, completed=completed, loss="-", rate="-")
            terminal = (sys.stdout, sys.stderr)
            self._bar.start()
            self._route_logging(terminal)
            _open.add(self)

    def update(self, n: int, *, examples: int, train_s: float, loss: float | None = None) -> None:
        """`n` more steps done; `examples` and `train_s` are the run's totals so far (for the rates)."""
        self._recent.append((examples, train_s))
        if self._bar is not None and n:
            fields = {"rate": f"{self.current_rate():.1f}"}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            self._bar.update(self._task, advance=n, **fields)

    def current_rate(self) -> float:
        """Examples per training second over the last RATE_WINDOW_S (at least the last step)."""
        examples, now = self._recent[-1]
        start = next((s for s in self._recent if s[1] >= now - RATE_WINDOW_S), self._recent[0])
        if start[1] >= now and len(self._recent) > 1:
            start = self._recent[-2]
        return (examples - start[0]) / (now - start[1]) if now > start[1] else float("nan")

    def window_rate(self) -> float:
        """Examples per training second since the previous call (one logging window); starts the next window."""
        (examples, now), (examples0, then) = self._recent[-1], self._mark
        self._mark = (examples, now)
        return (examples - examples0) / (now - then) if now > then else float("nan")

    def close(self) -> None:
        """Stop the bar (drawn once more, complete, cursor shown); safe to call twice."""
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.stop()
            for handler, stream in self._streams:
                handler.setStream(stream)
            self._streams = []
            _open.discard(self)

    def _route_logging(self, terminal: tuple[object, object]) -> None:
        """Log lines to the terminal go above the bar: rich's stdout/stderr proxies print them there.

        Logging handlers hold the stream they were configured with (Hydra's console handler: sys.stdout at
        start-up), so a line written while the bar is live would land inside the bar's redraw.
        """
        proxies = dict(zip(map(id, terminal), (sys.stdout, sys.stderr), strict=True))
        for logger in (logging.getLogger(), logging.getLogger("robustft")):
            for handler in logger.handlers:
                proxy = proxies.get(id(getattr(handler, "stream", None)))
                if type(handler) is logging.StreamHandler and proxy is not None and proxy is not handler.stream:
                    self._streams.append((handler, handler.setStream(proxy)))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@contextlib.contextmanager
def bars_closed() -> Iterator[None]:
    """Stop every bar still drawn when the block exits, however it exits (SIGTERM's Interrupted, an error, Ctrl-C).

    The CLI wraps a run in this so its one-line message comes after the bar, never inside its redraw.
    """
    try:
        yield
    finally:
        for bar in list(_open):
            bar.close()
