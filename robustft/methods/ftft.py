"""Dataset cartography (Swayamdipta et al., 2020) and FTFT (Du, Gatt & Nguyen, COLING 2025).

Both are `DataMapMethod`: a *reference* model is fine-tuned (ERM) on the whole training set while its
per-epoch training logits are recorded (`trainer.record_dynamics`); the data-map statistics of those
dynamics (robustft/cartography.py) select a subset (default: the 33% most ambiguous examples), and the
main model is fine-tuned on that subset only.

- `method=cartography`: the reference is the main model itself (`reference.model: null`), the main
  model trains on the subset with the usual schedule.
- `method=ftft`: the reference is a cheaper model (default: minilm truncated to 2 layers; any model
  config, e.g. `glove_bow`, or a hub model online), and the main model uses aggressive early stopping:
  evaluation every `eval_interval` steps with patience `early_stopping_patience` (2, as the paper),
  keeping the best checkpoint. conf/trainer/default.yaml takes these two as the defaults of
  `trainer.eval_every` / `trainer.early_stopping_patience`, so explicit trainer overrides still win.

Reference runs are cached under `reference.cache_dir/<key>`, a normal run directory (run_info.json,
metrics.json, training_dynamics/, reference.json with the key's inputs). The key hashes the composed
reference config (model, trainer minus logging/saving knobs, task, stress), the seed and the content of
the training split. A completed cached run is reused (logged, `reference/reused=1`, its path in
run_info.json `reference.path`); otherwise it is trained (`robustft.runner.fit`) and the global RNG
state is restored afterwards, so the main run is the same whether the reference was cached or not.
`selection: random` needs no reference. Costs: `cost/reference_*` (the reference run's training cost,
also when reused), `cost/main_*` (this run's loop) and `cost/total_*` = reference + main.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf

from robustft import checkpoint as ckpt
from robustft.cartography import (
    RULES,
    STATS_FILE,
    compute_stats,
    epoch_files,
    read_dynamics,
    select,
    write_stats,
)
from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext
from robustft.rundir import RunDir, write_json

log = logging.getLogger("robustft")

KEY_FORMAT = 1
# trainer keys that do not change the recorded dynamics: left out of the cache key
KEY_IGNORED_TRAINER = frozenset({"log_every", "save_every", "save_checkpoints", "eval_batch_size", "device",
                                 "interrupt_at_step"})


def data_fingerprint(ds: Dataset, fields: list[str]) -> str:
    """sha256 of the training split's ids, texts and labels (what the reference trains on)."""
    h = hashlib.sha256()
    for col in ["idx", *fields, "label"]:
        h.update(col.encode())
        h.update(json.dumps(list(ds[col])).encode())
    return h.hexdigest()


def reference_key(ref_cfg: DictConfig, train: Dataset) -> tuple[str, dict[str, Any]]:
    """(key, the inputs hashed into it) for a composed reference config and its training split."""
    trainer = {k: v for k, v in OmegaConf.to_container(ref_cfg.trainer).items() if k not in KEY_IGNORED_TRAINER}
    source = {
        "format": KEY_FORMAT,
        "model": OmegaConf.to_container(ref_cfg.model),
        "trainer": trainer,
        "task": OmegaConf.to_container(ref_cfg.task),
        "stress": OmegaConf.to_container(ref_cfg.stress) if ref_cfg.get("stress") is not None else None,
        "seed": int(ref_cfg.seed),
        "train_data": data_fingerprint(train, list(ref_cfg.task.text_fields)),
    }
    digest = hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], source


def is_complete(path: Path) -> bool:
    """A finished reference run: status completed and at least one dynamics epoch file."""
    info = path / "run_info.json"
    if not info.is_file():
        return False
    try:
        done = json.loads(info.read_text()).get("status") == "completed"
        return done and bool(epoch_files(path))
    except (ValueError, OSError):
        return False


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel sweep jobs never train the same reference twice at once."""
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


class DataMapMethod(Method):
    """Fine-tune on the subset of the training data selected by a reference model's data map."""

    def __init__(self, *, name: str, selection: str, fraction: float, variability_ddof: int, burn_out: int | None,
                 reference: DictConfig | dict[str, Any]) -> None:
        super().__init__(name)
        if selection not in RULES:
            raise UserError(f"method.selection={selection} is unknown; choose one of {', '.join(RULES)}")
        if not 0 < float(fraction) <= 1:
            raise UserError(f"method.fraction={fraction} must be in (0, 1], e.g. 0.33")
        # reference is a free-form node in the YAML: its keys are checked here (model_overrides stays free)
        takes = {"model", "model_overrides", "trainer", "seed", "reuse", "cache_dir"}
        if set(reference) != takes:
            wrong = sorted(set(reference) ^ takes)
            raise UserError(f"method.reference: {'unknown' if wrong[0] in reference else 'missing'} option "
                            f"'method.reference.{wrong[0]}'; it takes {', '.join(sorted(takes))}")
        self.selection, self.fraction = selection, float(fraction)
        self.ddof, self.burn_out = int(variability_ddof), burn_out
        self.reference = OmegaConf.create(reference)
        self.reference_metrics: dict[str, float] = {}
        self.reused = False
        self.n_selected = self.n_total = 0

    # --- data ------------------------------------------------------------------------------------
    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        if ctx.task.is_regression:
            raise UserError(f"method={self.name} needs a classification task (data maps use gold-label "
                            f"probabilities); {ctx.task.name} is regression")
        cfg, run = ctx.extra.get("cfg"), ctx.extra.get("run")
        if cfg is None:
            raise UserError(f"method={self.name} needs the run config in ctx.extra['cfg'] (robustft.runner.fit sets it)")
        guids = np.asarray(list(train["idx"]), dtype=np.int64)
        info: dict[str, Any] = {"rule": self.selection, "fraction": self.fraction, "variability_ddof": self.ddof,
                                "burn_out": self.burn_out}
        if self.selection == "random":
            chosen = select(None, "random", self.fraction, seed=ctx.seed, guids=guids)
            reference = None
        else:
            path, key, reused = self.reference_run(cfg, train)
            dyn = read_dynamics(path, self.burn_out)
            if not np.array_equal(dyn.guid, np.sort(guids)):
                raise UserError(f"the reference dynamics in {path} cover other examples than this run's training "
                                "split; delete that folder to retrain the reference")
            stats = compute_stats(dyn, ddof=self.ddof)
            if ctx.run_dir is not None:
                write_stats(stats, Path(ctx.run_dir) / STATS_FILE)
            chosen = select(stats, self.selection, self.fraction)
            reference = {"path": str(path), "key": key, "reused": reused, "epochs": dyn.num_epochs,
                         "model": self.reference_model_name(cfg)}
        keep = set(chosen.tolist())
        rows = [i for i, g in enumerate(guids.tolist()) if g in keep]
        self.n_selected, self.n_total = len(rows), len(guids)
        info.update(n_selected=self.n_selected, n_total=self.n_total)
        log.info("%s: kept %d of %d training examples (%s, fraction %.2f)", self.name, self.n_selected,
                 self.n_total, self.selection, self.fraction)
        if ctx.run_dir is not None:
            write_json(Path(ctx.run_dir) / "selection.json", {**info, "reference": reference, "guids": chosen.tolist()})
        if run is not None:
            run.update(reference=reference, selection=info)
        return train.select(rows)

    # --- the reference run -------------------------------------------------------------------------
    def reference_model_name(self, cfg: DictConfig) -> str:
        model = self.reference.get("model")
        if model is None:
            return str(cfg.model.name)
        return str(model) if isinstance(model, str) else str(model.get("name", "custom"))

    def reference_config(self, cfg: DictConfig) -> DictConfig:
        """The main config with the reference model and trainer, ERM, dynamics on, no evaluators."""
        from robustft.cli import CONF_DIR

        base = OmegaConf.to_container(cfg, resolve=False)
        base.pop("hydra", None)
        base.pop("robustness", None)
        choice = self.reference.get("model")
        if choice is None:
            model = base["model"]
        elif isinstance(choice, str):
            file = CONF_DIR / "model" / f"{choice}.yaml"
            if not file.is_file():
                options = ", ".join(sorted(p.stem for p in file.parent.glob("*.yaml")))
                raise UserError(f"method.reference.model={choice} is not a model config; choose one of: {options}")
            model = OmegaConf.to_container(OmegaConf.load(file))
        else:
            model = OmegaConf.to_container(choice)
        overrides = self.reference.get("model_overrides") or {}
        base["model"] = OmegaConf.to_container(OmegaConf.merge(model, overrides))
        base["method"] = {"_target_": "robustft.methods.vanilla.Vanilla", "name": "vanilla"}
        if "selector" in base:
            base["selector"] = {"name": "none"}
        trainer = OmegaConf.merge(base["trainer"], self.reference.get("trainer") or {})
        base["trainer"] = OmegaConf.to_container(trainer)
        base["trainer"]["record_dynamics"] = True
        base["trainer"].pop("interrupt_at_step", None)
        seed = self.reference.get("seed")
        base.update(seed=int(cfg.seed if seed is None else seed), train=True, ckpt_path=None, resume="auto",
                    tag="reference")
        ref = OmegaConf.create(base)
        OmegaConf.resolve(ref)
        return ref

    def reference_run(self, cfg: DictConfig, train: Dataset) -> tuple[Path, str, bool]:
        """Reuse the cached reference run for this config/data/seed, or train it; returns (path, key, reused)."""
        ref_cfg = self.reference_config(cfg)
        key, source = reference_key(ref_cfg, train)
        cache = Path(str(self.reference.get("cache_dir") or "~/.cache/robustft/references")).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / key
        with file_lock(cache / f".{key}.lock"):
            if is_complete(path) and self.reference.get("reuse", True):
                log.info("%s: reusing reference run %s (model %s, seed %s): its training dynamics exist",
                         self.name, path, ref_cfg.model.name, ref_cfg.seed)
                self.reused = True
            else:
                resumable = (path / "checkpoints" / "last").is_dir() and not is_complete(path)
                if path.exists() and not resumable:
                    log.info("%s: discarding the reference run in %s (%s)", self.name, path,
                             "reuse=false" if is_complete(path) else "incomplete")
                    shutil.rmtree(path)
                log.info("%s: training reference model %s on %d examples into %s (no cached dynamics)",
                         self.name, ref_cfg.model.name, len(train), path)
                state = ckpt.rng_state()
                try:
                    self._fit_reference(ref_cfg, path, source)
                finally:
                    ckpt.set_rng_state(state)  # the main run does not depend on whether this ran
                self.reused = False
        metrics = json.loads((path / "metrics.json").read_text())
        self.reference_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        return path, key, self.reused

    def _fit_reference(self, ref_cfg: DictConfig, path: Path, source: dict[str, Any]) -> None:
        from robustft.errors import Interrupted
        from robustft.runner import fit

        run = RunDir(path)
        write_json(path / "reference.json", source)
        OmegaConf.save(ref_cfg, path / "reference_config.yaml")
        run.start(seed=int(ref_cfg.seed), task=ref_cfg.task.name, method="reference", model=ref_cfg.model.name,
                  tag="reference", wall_time_s_before=run.info.get("wall_time_s", 0.0))
        try:
            fit(ref_cfg, run)
        except Interrupted as e:
            run.finish("interrupted", str(e))
            raise
        except BaseException as e:
            run.finish("failed", f"{type(e).__name__}: {e}")
            raise
        run.finish("completed")

    # --- final metrics -----------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        ref = self.reference_metrics
        main_flops = float(train_metrics.get("cost/train_flops", 0.0))
        main_wall = float(train_metrics.get("train/wall_s", 0.0))
        ref_flops, ref_wall = float(ref.get("cost/train_flops", 0.0)), float(ref.get("train/wall_s", 0.0))
        return {
            "cost/reference_flops": ref_flops,
            "cost/reference_tokens": float(ref.get("cost/train_tokens", 0.0)),
            "cost/reference_wall_s": ref_wall,
            "cost/main_flops": main_flops,
            "cost/main_wall_s": main_wall,
            "cost/total_flops": ref_flops + main_flops,
            "cost/total_wall_s": ref_wall + main_wall,
            "reference/reused": float(self.reused),
            "selection/n_selected": float(self.n_selected),
            "selection/n_total": float(self.n_total),
        }
