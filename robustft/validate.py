"""Start-up checks of the config's numbers and choices: one place, one-line errors.

The CLI pre-flight runs `validate` on every swept value before Hydra creates a run directory, and
`robustft.runner.fit` runs it again, so in-process callers, each sweep job and configs the pre-flight
cannot see (`-cd`, `interval(...)` sweeps) get the same check. A value the loop would divide by, or one
that trains nothing (`epochs=0`), must fail here rather than as a traceback or a run that says
`completed`. Only omegaconf is imported: the pre-flight stays fast.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError, excerpt

RESUME = ("auto", "never")
PRECISION = ("auto", "bf16", "fp32")
KEEP_CHECKPOINTS = ("all", "best", "none")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# trainer sizes and intervals that the loop divides by or batches with; each must be >= 1
POSITIVE_INTS = {"batch_size": 16, "eval_batch_size": 128, "grad_accum": 1, "log_every": 50, "save_every": 500}
SEED_MAX = 2**32 - 1  # numpy's seed range (np.random.seed, datasets' shuffle): a seed outside it is a traceback


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(key: str, value: Any, example: int) -> None:
    if not _is_int(value) or value < 1:
        raise UserError(f"{key}={excerpt(repr(value))} must be a whole number >= 1; e.g. {key}={example}")


def _number(key: str, value: Any, low: float, high: float | None, fix: str) -> None:
    """`value` must be a number in [low, high] (high=None: no upper bound)."""
    if not _is_number(value):
        raise UserError(f"{key}={excerpt(repr(value))} is not a number; {fix}")
    if value < low or (high is not None and value > high):
        where = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise UserError(f"{key}={excerpt(repr(value))} must be {where}; {fix}")


def _seed(key: str, value: Any, optional: bool = False) -> None:
    """A seed numpy accepts: a whole number in [0, 2**32-1] (null too when `optional`: the run seed)."""
    if value is None and optional:
        return
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise UserError(f"{key}={excerpt(repr(value))} must be a whole number in [0, {SEED_MAX}] (numpy's seed range); "
                        f"e.g. {key}=42")


def _cap(key: str, value: Any) -> None:
    """A sample cap: null (all) or a whole number >= 1 (0 or -1 would silently keep nothing or all but one)."""
    if value is not None and (not _is_int(value) or value < 1):
        raise UserError(f"{key}={excerpt(repr(value))} must be null (all examples) or a whole number >= 1; e.g. {key}=1000")


def parse_ratio(value: Any) -> Fraction:
    """`stress.imbalance.ratio`: 0.1, "0.1" or "1:10" -> Fraction(1, 10); must lie in (0, 1]."""
    text = str(value).strip()
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            ratio = Fraction(int(a), int(b))
        else:
            ratio = Fraction(text).limit_denominator(10_000)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"stress.imbalance.ratio={excerpt(repr(value))} is not a ratio; use e.g. 0.1 or '1:10'") from None
    if not 0 < ratio <= 1:
        raise UserError(f"stress.imbalance.ratio={value} must be in (0, 1] (minority:majority); "
                        "use e.g. 0.1 or '1:10' (null = off)")
    return ratio


def validate_task(task: DictConfig | None) -> None:
    """Sample caps and the split seed of `cfg.task`."""
    if task is None:
        return
    for name in ("max_train_samples", "max_eval_samples"):
        _cap(f"task.{name}", task.get(name))
    _seed("task.split_seed", task.get("split_seed"), optional=True)


def validate_trainer(t: DictConfig) -> None:
    """Sizes, intervals, the schedule, precision and device of `cfg.trainer`."""
    _number("trainer.lr", t.get("lr"), 0, None, "use a learning rate such as trainer.lr=2e-5")
    for name, example in POSITIVE_INTS.items():
        _positive_int(f"trainer.{name}", t.get(name), example)
    eval_every = t.get("eval_every")
    if eval_every != "epoch" and (not _is_int(eval_every) or eval_every < 1):
        raise UserError(f"trainer.eval_every={excerpt(repr(eval_every))} must be 'epoch' or a number of steps >= 1; "
                        "e.g. trainer.eval_every=epoch")
    max_steps, epochs = t.get("max_steps"), t.get("epochs")
    if not _is_int(max_steps):
        raise UserError(f"trainer.max_steps={excerpt(repr(max_steps))} is not a whole number; use -1 (train by epochs) or a step count")
    if max_steps <= 0 and (not _is_int(epochs) or epochs < 1):
        raise UserError(f"trainer.epochs={excerpt(repr(epochs))} trains nothing; use trainer.epochs>=1 (or trainer.max_steps>0)")
    _cap("trainer.eval_max_examples", t.get("eval_max_examples"))
    _number("trainer.max_grad_norm", t.get("max_grad_norm"), 0, None, "use e.g. trainer.max_grad_norm=1.0")
    _number("trainer.weight_decay", t.get("weight_decay"), 0, None, "use e.g. trainer.weight_decay=0.01 (0 = off)")
    _number("trainer.warmup_ratio", t.get("warmup_ratio"), 0, 1,
            "it is the fraction of steps spent warming up, e.g. trainer.warmup_ratio=0.06")
    patience = t.get("early_stopping_patience")
    if not _is_int(patience) or patience < 0:
        raise UserError(f"trainer.early_stopping_patience={excerpt(repr(patience))} must be a whole number >= 0; "
                        "use 0 (off) or the evals without improvement before stopping, e.g. 2")
    precision, device = t.get("precision"), t.get("device")
    if precision not in PRECISION:
        raise UserError(f"trainer.precision={excerpt(precision)} is not supported; use auto, bf16 or fp32")
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise UserError(f"trainer.device={excerpt(device)} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    keep = t.get("keep_checkpoints")
    if keep not in KEEP_CHECKPOINTS:
        raise UserError(f"trainer.keep_checkpoints={excerpt(keep)} is not an option; use all, best (checkpoints/best only) "
                        "or none (records only)")
    threads = t.get("threads", "auto")
    if threads != "auto" and (not _is_int(threads) or threads < 1):
        raise UserError(f"trainer.threads={excerpt(repr(threads))} must be auto or a whole number >= 1; use auto (the cores "
                        "available, divided among local jobs) or e.g. trainer.threads=1")
    devices = t.get("devices")
    if devices != "auto" and (not _is_int(devices) or devices < 1):
        raise UserError(f"trainer.devices={excerpt(repr(devices))} must be auto or a whole number >= 1; use auto (the processes "
                        "torchrun or SLURM start) or the number of processes the run must have, e.g. 2")


def validate_stress(stress: DictConfig | None) -> None:
    """`stress.low_resource.n` is a sample size: 0 or a negative size is a mistake, not "off" (null is off);
    the same for an imbalance ratio of 0 (null is off), and a noise rate is a fraction."""
    if stress is None:
        return
    _seed("stress.seed", stress.get("seed"), optional=True)
    ratio = OmegaConf.select(stress, "imbalance.ratio", default=None)
    if ratio is not None:
        parse_ratio(ratio)
    rate = OmegaConf.select(stress, "label_noise.rate", default=None)
    if rate is not None:
        _number("stress.label_noise.rate", rate, 0, 1, "it is the fraction of each class's labels flipped, e.g. 0.2")
    n = OmegaConf.select(stress, "low_resource.n", default=None)
    if n is None and stress.get("name") == "low_resource":
        raise UserError("stress=low_resource needs stress.low_resource.n; set e.g. stress.low_resource.n=500")
    if n is not None and (not _is_int(n) or n < 1):
        raise UserError(f"stress.low_resource.n={excerpt(repr(n))} must be a whole number >= 1; e.g. stress.low_resource.n=500 "
                        "(null = no subsampling)")


def validate_selection(task: DictConfig | None) -> None:
    """`task.selection` is dev or carve; with carve, `task.selection_size` is a count >= 1 or a fraction in (0, 1)."""
    if task is None or "selection" not in task:
        return
    selection, size = task.get("selection"), task.get("selection_size")
    if selection not in ("dev", "carve"):
        raise UserError(f"task.selection={selection} is not an option; use carve (a selection split carved out of "
                        "train; the official dev is held out as test/*) or dev (select on the official dev)")
    if selection != "carve":
        return
    fix = "use a count such as task.selection_size=872 or a fraction of train such as task.selection_size=0.1"
    if not _is_number(size) or size <= 0 or (size >= 1 and not float(size).is_integer()):  # 872.0 is a count
        raise UserError(f"task.selection_size={size!r} is neither a count >= 1 nor a fraction in (0, 1); {fix}")


def validate(cfg: DictConfig) -> None:
    """Raise UserError (one line: problem; fix) for the first bad value of the run config."""
    resume = cfg.get("resume")
    if resume not in RESUME:
        raise UserError(f"resume={excerpt(resume)} is not an option; use resume=auto (continue from checkpoints/last) "
                        "or resume=never (start fresh)")
    _seed("seed", cfg.get("seed"))
    validate_trainer(cfg.trainer)
    validate_task(cfg.get("task"))
    validate_stress(cfg.get("stress"))
    validate_selection(cfg.get("task"))
    from robustft.loggers import base as loggers  # finds the tracker libraries, imports none

    loggers.check(cfg.get("logger"))
