"""`robustft-torchrun`: torchrun for robustft, with robustft's one-line errors and exit codes.

`robustft-torchrun --nproc_per_node=2 task=rte trainer.lr=...` = `torchrun --nproc_per_node=2 -m robustft
task=rte trainer.lr=...`, except for how a failure ends. Plain torchrun turns any child's non-zero exit into
its own ChildFailedError traceback and exit 1, even when every rank stopped on a bad input with robustft's
one line and exit 2 (issue 25). Here the pre-flight (robustft/preflight.py) runs in this launching process
before any child starts, and when the children's first failure is robustft's (exit 2: bad input, 3:
interrupted; rank 0 printed the line), this process exits with that code and adds nothing. Any other
failure keeps torchrun's report.

Arguments: torchrun's options first (anything starting with `-`, and the value after an option given as
`--opt value`), then robustft's `key=value` overrides.
"""

from __future__ import annotations

import sys

from robustft.errors import UserError

# robustft.cli's exit codes that already printed their one line (bad input; interrupted, resumable)
ROBUSTFT_CODES = (2, 3)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, robustft's overrides): overrides start at the first `key=value` not led by `-`."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-") and "=" in arg:
            return argv[:i], argv[i:]
    return argv, []


def launch(torch_args: list[str], overrides: list[str]) -> int:
    """Run the pre-flight here, then torchrun's elastic agent on `-m robustft <overrides>`; the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from robustft import preflight

    if any(a in ("-m", "--multirun") for a in [*torch_args, *overrides]):  # before overrides too: torchrun's -m
        raise UserError("-m (a sweep) cannot run under torchrun; start one robustft-torchrun per job, or sweep with "
                        "hydra/launcher=slurm hydra.launcher.tasks_per_node=N (each job data-parallel)")
    preflight.check(overrides, multirun=False)
    args = parse_args([*torch_args, "-m", "robustft", *overrides])
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if failure.exitcode in ROBUSTFT_CODES:  # rank 0 printed robustft's line; torchrun's report adds nothing
            return failure.exitcode
        raise
    return 0


def main() -> None:
    torch_args, overrides = split_args(sys.argv[1:])
    if not overrides and any(a in ("-h", "--help") for a in torch_args):
        print(__doc__.strip())
        return
    try:
        code = launch(torch_args, overrides)
    except UserError as e:
        print(f"robustft: error: {e}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
