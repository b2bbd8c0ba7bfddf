"""User-facing errors: one line that names the problem and the fix, then a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

QUOTE_LIMIT = 200  # characters of user data (a header row, a label) an error line quotes


def excerpt(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """`value` as text, cut to about `limit` characters, to quote user data in an error line.

    A 10 MB single-line train.tsv once made a 10 MB error line (its "header"), stored in run_info.json too.
    The cut keeps the start and says how long the whole was; line breaks are escaped so the error stays one line.
    """
    text = str(value).replace("\r", "\\r").replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


class UserError(Exception):
    """Bad input (config, data, files). The CLI prints `robustft: error: <message>` and exits 2."""


class Interrupted(Exception):
    """A run stopped before its end (SIGTERM, preemption, `trainer.interrupt_at_step`); checkpoints are kept."""


class Signalled(Interrupted):
    """SIGTERM (preemption, scancel, requeue, torchrun stopping its job) or SIGINT (Ctrl-C): it reaches every rank
    at about the same time. The training loop fills in `step` (where it stopped) on its way out.

    `pending` keeps the signal once it has arrived: code that catches Exception (a logging handler, a library's
    retry) could swallow the exception raised in the handler, and the loop raises it again at its next step.
    """

    pending: int | None = None

    def __init__(self, signum: int, step: int | None = None) -> None:
        super().__init__(signum, step)
        self.signum, self.step = signum, step

    @classmethod
    def unmasked(cls, error: BaseException) -> BaseException:
        """`error`, or the pending signal when code between the handler and the loop turned the handler's
        exception into an error of its own: transformers' `tokenizer.pad` wraps any Exception in a ValueError
        ("Unable to create tensor"), which made a Ctrl-C during collate a failed run with a traceback."""
        if cls.pending is None or isinstance(error, cls) or not isinstance(error, Exception):
            return error
        return cls(cls.pending)

    def __str__(self) -> str:
        import signal

        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else self.signum
        return f"interrupted at step {self.step} ({name})" if self.step is not None else f"interrupted by {name}"


@contextlib.contextmanager
def signal_unmasked() -> Iterator[None]:
    """An Exception leaving the block while a signal is pending leaves as that `Signalled` (`Signalled.unmasked`)."""
    try:
        yield
    except Exception as e:
        signalled = Signalled.unmasked(e)
        if signalled is e:
            raise
        raise signalled from e
