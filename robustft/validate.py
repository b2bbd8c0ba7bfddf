"""Start-up checks of the config's numbers and choices: one place, one-line errors.

The CLI pre-flight runs `validate` on every swept value before Hydra creates a run directory, and
`robustft.runner.fit` runs it again, so in-process callers, each sweep job and configs the pre-flight
cannot see (`-cd`, `interval(...)` sweeps) get the same check. A value the loop would divide by, or one
that trains nothing (`epochs=0`), must fail here rather than as a traceback or a run that says
`completed`. Only omegaconf is imported: the pre-flight stays fast.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError

RESUME = ("auto", "never")
PRECISION = ("auto", "bf16", "fp32")
KEEP_CHECKPOINTS = ("all", "best", "none")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# trainer sizes and intervals that the loop divides by or batches with; each must be >= 1
POSITIVE_INTS = {"batch_size": 16, "eval_batch_size": 128, "grad_accum": 1, "log_every": 50, "save_every": 500}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(key: str, value: Any, example: int) -> None:
    if not _is_int(value) or value < 1:
        raise UserError(f"{key}={value!r} must be a whole number >= 1; e.g. {key}={example}")


def _number(key: str, value: Any, low: float, high: float | None, fix: str) -> None:
    """`value` must be a number in [low, high] (high=None: no upper bound)."""
    if not _is_number(value):
        raise UserError(f"{key}={value!r} is not a number; {fix}")
    if value < low or (high is not None and value > high):
        where = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise UserError(f"{key}={value!r} must be {where}; {fix}")


def validate_trainer(t: DictConfig) -> None:
    """Sizes, intervals, the schedule, precision and device of `cfg.trainer`."""
    _number("trainer.lr", t.get("lr"), 0, None, "use a learning rate such as trainer.lr=2e-5")
    for name, example in POSITIVE_INTS.items():
        _positive_int(f"trainer.{name}", t.get(name), example)
    eval_every = t.get("eval_every")
    if eval_every != "epoch" and (not _is_int(eval_every) or eval_every < 1):
        raise UserError(f"trainer.eval_every={eval_every!r} must be 'epoch' or a number of steps >= 1; "
                        "e.g. trainer.eval_every=epoch")
    max_steps, epochs = t.get("max_steps"), t.get("epochs")
    if not _is_int(max_steps):
        raise UserError(f"trainer.max_steps={max_steps!r} is not a whole number; use -1 (train by epochs) or a step count")
    if max_steps <= 0 and (not _is_int(epochs) or epochs < 1):
        raise UserError(f"trainer.epochs={epochs!r} trains nothing; use trainer.epochs>=1 (or trainer.max_steps>0)")
    _number("trainer.weight_decay", t.get("weight_decay"), 0, None, "use e.g. trainer.weight_decay=0.01 (0 = off)")
    _number("trainer.warmup_ratio", t.get("warmup_ratio"), 0, 1,
            "it is the fraction of steps spent warming up, e.g. trainer.warmup_ratio=0.06")
    patience = t.get("early_stopping_patience")
    if not _is_int(patience) or patience < 0:
        raise UserError(f"trainer.early_stopping_patience={patience!r} must be a whole number >= 0; "
                        "use 0 (off) or the evals without improvement before stopping, e.g. 2")
    precision, device = t.get("precision"), t.get("device")
    if precision not in PRECISION:
        raise UserError(f"trainer.precision={precision} is not supported; use auto, bf16 or fp32")
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise UserError(f"trainer.device={device} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    keep = t.get("keep_checkpoints")
    if keep not in KEEP_CHECKPOINTS:
        raise UserError(f"trainer.keep_checkpoints={keep} is not an option; use all, best (checkpoints/best only) "
                        "or none (records only)")
    devices = t.get("devices")
    if devices != "auto" and (not _is_int(devices) or devices < 1):
        raise UserError(f"trainer.devices={devices!r} must be auto or a whole number >= 1; use auto (the processes "
                        "torchrun or SLURM start) or the number of processes the run must have, e.g. 2")


def validate_stress(stress: DictConfig | None) -> None:
    """`stress.low_resource.n` is a sample size: 0 or a negative size is a mistake, not "off" (null is off)."""
    if stress is None:
        return
    n = OmegaConf.select(stress, "low_resource.n", default=None)
    if n is None and stress.get("name") == "low_resource":
        raise UserError("stress=low_resource needs stress.low_resource.n; set e.g. stress.low_resource.n=500")
    if n is not None and (not _is_int(n) or n < 1):
        raise UserError(f"stress.low_resource.n={n!r} must be a whole number >= 1; e.g. stress.low_resource.n=500 "
                        "(null = no subsampling)")


def validate(cfg: DictConfig) -> None:
    """Raise UserError (one line: problem; fix) for the first bad value of the run config."""
    resume = cfg.get("resume")
    if resume not in RESUME:
        raise UserError(f"resume={resume} is not an option; use resume=auto (continue from checkpoints/last) "
                        "or resume=never (start fresh)")
    validate_trainer(cfg.trainer)
    validate_stress(cfg.get("stress"))
    from robustft.loggers import base as loggers  # finds the tracker libraries, imports none

    loggers.check(cfg.get("logger"))
