"""User-facing errors: one line that names the problem and the fix, then a non-zero exit."""


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

    def __str__(self) -> str:
        import signal

        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else self.signum
        return f"interrupted at step {self.step} ({name})" if self.step is not None else f"interrupted by {name}"
