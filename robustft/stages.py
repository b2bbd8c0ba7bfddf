"""Stages: runs a method needs before its main training.

A method declares them (`Method.stages()`); the runner (robustft/runner.py `run_stage`) runs each one with
the same lifecycle as any run (run_info status, resume from its own checkpoints/last, SIGTERM ->
interrupted), caches and reuses it when it is cacheable, links it from the main run as
`stages/<name>`, records it in run_info.json `stages.<name>` and adds its cost to `cost/<name>_*` and
`cost/total_*`. The method gets back only the stage's artifacts (`StageResult`: its folder and metrics).

Two kinds: a `RunStage` is a run of its own (the reference run of FTFT and dataset cartography: a vanilla
run of a reference model with training dynamics); a `ModelStage` works on the main model inside the main
run before its loop (weight mixup's bi-level stage 1), recorded in run_info.json the same way. This module holds the declarations, the composition of a stage's config from the
config groups (Hydra's compose API) and the cache key; it imports nothing that trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig, OmegaConf

from robustft.config import compose_group

KEY_FORMAT = 1
# trainer keys that do not change what a stage computes: left out of the cache key
KEY_IGNORED_TRAINER = frozenset({"log_every", "save_every", "save_checkpoints", "keep_checkpoints", "eval_batch_size",
                                 "device", "interrupt_at_step"})


@dataclass
class RunStage:
    """A vanilla run of its own before the main training, e.g. a reference model that records dynamics.

    `model`: a model config name (conf/model), a dict, or None for the main run's model; `trainer`
    values are merged into the main run's trainer config. A stage with a `cache_dir` runs in
    `<cache_dir>/<key>` and is reused by every run with the same key (config + training data + seed);
    without one it runs in `<run>/stages/<name>`. `product` is a path inside the stage's folder that a
    completed stage has (e.g. `training_dynamics`).
    """

    name: str
    model: Any = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    product: str | None = None
    cache_dir: str | None = None
    reuse: bool = True


@dataclass
class ModelStage:
    """A stage on the main model inside the main run, before its loop (weight mixup's bi-level stage 1).

    `run(model, train, loop)` gets the tokenized training set and a `LoopHandle` (log a row, save
    checkpoints/last, the autocast dtype); it does what is left of it after a resume: its progress is
    method state, saved with checkpoints/last. The loop runs it after restoring that state and records
    its status in run_info.json `stages.<name>`; its compute is the method's to report (`metrics`).
    """

    name: str
    run: Callable[[Any, Any, Any], None]


@dataclass
class StageResult:
    """What a method gets back from a stage."""

    name: str
    path: Path  # the stage's run directory
    key: str | None  # cache key (None when not cached)
    reused: bool  # True when a cached completed run was reused
    metrics: dict[str, float]  # the stage run's metrics.json (numbers only)
    config: DictConfig | None = None


def stage_config(stage: RunStage, cfg: DictConfig) -> DictConfig:
    """The main config with the stage's model and trainer, plain ERM (method=vanilla), no evaluators."""
    base = OmegaConf.to_container(cfg, resolve=False)
    base.pop("hydra", None)
    base.pop("robustness", None)
    if stage.model is None:
        model = base["model"]
    elif isinstance(stage.model, str):
        model = compose_group("model", stage.model, f"method.{stage.name}.model")
    else:
        model = OmegaConf.to_container(OmegaConf.create(stage.model))
    base["model"] = OmegaConf.to_container(OmegaConf.merge(model, stage.model_overrides or {}))
    base["method"] = compose_group("method", "vanilla", "method")
    if "selector" in base:
        base["selector"] = compose_group("selector", "none", "selector")
    base["trainer"] = OmegaConf.to_container(OmegaConf.merge(base["trainer"], stage.trainer or {}))
    base["trainer"].pop("interrupt_at_step", None)
    base.update(seed=int(cfg.seed if stage.seed is None else stage.seed), train=True, ckpt_path=None,
                resume="auto", tag=stage.name)
    out = OmegaConf.create(base)
    OmegaConf.resolve(out)
    return out


def data_fingerprint(ds: Dataset, fields: list[str]) -> str:
    """sha256 of the training split's ids, texts and labels (what the stage trains on)."""
    h = hashlib.sha256()
    for col in ["idx", *fields, "label"]:
        h.update(col.encode())
        h.update(json.dumps(list(ds[col])).encode())
    return h.hexdigest()


def stage_key(stage_cfg: DictConfig, train: Dataset) -> tuple[str, dict[str, Any]]:
    """(key, the inputs hashed into it) for a composed stage config and its training split."""
    trainer = {k: v for k, v in OmegaConf.to_container(stage_cfg.trainer).items() if k not in KEY_IGNORED_TRAINER}
    source = {
        "format": KEY_FORMAT,
        "model": OmegaConf.to_container(stage_cfg.model),
        "trainer": trainer,
        "task": OmegaConf.to_container(stage_cfg.task),
        "stress": OmegaConf.to_container(stage_cfg.stress) if stage_cfg.get("stress") is not None else None,
        "seed": int(stage_cfg.seed),
        "train_data": data_fingerprint(train, list(stage_cfg.task.text_fields)),
    }
    digest = hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], source


def is_complete(path: Path, product: str | None) -> bool:
    """A finished stage run: status completed (and its product exists)."""
    info = path / "run_info.json"
    if not info.is_file():
        return False
    try:
        done = json.loads(info.read_text()).get("status") == "completed"
    except (ValueError, OSError):
        return False
    return done and (product is None or any((path / product).glob("*")) or (path / product).is_file())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel sweep jobs never train the same cached stage twice at once."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
