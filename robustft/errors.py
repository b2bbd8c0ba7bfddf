"""User-facing errors: one line that names the problem and the fix, then a non-zero exit."""


class UserError(Exception):
    """Bad input (config, data, files). The CLI prints `robustft: error: <message>` and exits 2."""


class Interrupted(Exception):
    """A run stopped before its end (SIGTERM, preemption, `trainer.interrupt_at_step`); checkpoints are kept."""


class Signalled(Interrupted):
    """SIGTERM (preemption, scancel, torchrun stopping its job): it reaches every rank at about the same time."""
