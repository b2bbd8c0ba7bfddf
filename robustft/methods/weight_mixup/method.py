"""The `WeightMixup` method: wraps the model's linear layers, subsamples N examples, runs stage 1 (the
bi-level `BiLevelStage`) before the loop and stage 2 (W only, alpha and W0 frozen) in the runner's loop.

Every option comes from `robustft/conf/method/weight_mixup.yaml`, the one place their defaults live; the
class takes them all, and an unknown one is a UserError.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustft import distributed
from robustft.errors import UserError
from robustft.methods.base import LoopHandle, Method, TrainContext, adamw, decay_groups
from robustft.methods.weight_mixup.bilevel import PRECONDITIONERS, SCHEDULES, BiLevelStage
from robustft.methods.weight_mixup.mixed import (
    COMPLEMENTS,
    MixedLinear,
    Scratch,
    alphas,
    inner_params,
    wrap_model,
)
from robustft.models import count_params
from robustft.stages import ModelStage
from robustft.stress import low_resource_rows

log = logging.getLogger("robustft")

# the keys of the nested option groups (their values: the YAML)
GROUPS = {
    "stage1": ("epochs", "batch_size", "train_fraction", "group_by_length"),
    "inner": ("lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm"),
    "outer": ("lr", "weight_decay", "warmup_ratio", "schedule"),
    "fd": ("radius", "precondition"),
    "stage2": ("lr", "weight_decay"),
}


def _group(value: Any, key: str) -> dict[str, Any]:
    """Option group `key` as a plain dict, exactly its keys (none unknown, none missing)."""
    given = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else dict(value or {})
    known = GROUPS[key]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UserError(f"method.{key} has unknown option(s) {unknown}; known: {', '.join(known)}")
    missing = [k for k in known if k not in given]
    if missing:
        raise UserError(f"method.{key} lacks {missing}; set them (defaults: robustft/conf/method/weight_mixup.yaml)")
    return given


class WeightMixup(Method):
    """Attention-guided weight mixup (see the package docstring); options as in its YAML."""

    def __init__(self, *, name: str, complement: str, init_std: float, train_size: int, folds: int,
                 average_weights: bool, stage1: Any, inner: Any, outer: Any, fd: Any, stage2: Any) -> None:
        # unknown top-level options never get here: robustft.methods.base.check_options rejects them first
        super().__init__(name)
        if complement not in COMPLEMENTS:
            raise UserError(f"method.complement={complement!r}; use one of {', '.join(COMPLEMENTS)}")
        self.complement, self.init_std = complement, float(init_std)
        self.train_size, self.folds, self.average_weights = int(train_size), int(folds), bool(average_weights)
        if self.folds < 0:
            raise UserError(f"method.folds={folds} must be >= 0 (0 = no stage 1)")
        self.stage1, self.inner, self.outer = _group(stage1, "stage1"), _group(inner, "inner"), _group(outer, "outer")
        self.fd, self.stage2 = _group(fd, "fd"), _group(stage2, "stage2")
        if self.fd["precondition"] not in PRECONDITIONERS:
            raise UserError(f"method.fd.precondition={self.fd['precondition']!r}; use adam or none")
        for level in (self.inner, self.outer):
            if level["schedule"] not in SCHEDULES:
                raise UserError(f"method schedule {level['schedule']!r}; use one of {', '.join(SCHEDULES)}")
        if not 0 < float(self.stage1["train_fraction"]) < 1:
            raise UserError("method.stage1.train_fraction must be in (0, 1) (official: 0.8)")
        self.scratch = Scratch()  # the mixed layers' shared buffers
        self.mixed: dict[str, MixedLinear] = {}
        self.bilevel: BiLevelStage | None = None  # stage 1, built by `setup`
        self._model: nn.Module | None = None

    # --- set-up -----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if distributed.world_size() > 1 and self.folds > 0:
            # stage 1's inner/outer steps and finite differences update W and alpha outside the loop's DDP step
            raise UserError(f"method=weight_mixup's stage 1 (bi-level, method.folds={self.folds}) runs in one "
                            f"process only, this run has {distributed.world_size()}; run it single-process "
                            "(no torchrun, SLURM tasks_per_node=1), or method.folds=0 to skip stage 1")
        self.ctx = ctx
        self.mixed = wrap_model(model, self.complement, self.scratch)
        self._model = model
        self.bilevel = BiLevelStage(model, self.mixed, ctx, folds=self.folds, init_std=self.init_std,
                                    average_weights=self.average_weights, stage1=self.stage1, inner=self.inner,
                                    outer=self.outer, fd=self.fd)
        return model

    def alphas(self) -> list[nn.Parameter]:
        return alphas(self.mixed)

    def inner_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Every parameter but a1, a2 (W0 is a buffer): the inner level's and stage 2's W."""
        return inner_params(model, self.mixed)

    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        """The N-example subsample (stratified; the same rows as stress=low_resource with n=N).

        Departure: official `random.sample` (uniform), and a train_size above the training set is an error
        here (official: silently all of it).
        """
        n = self.train_size
        if n < 0 or n == len(train):
            return train
        if not 0 < n <= len(train):
            raise UserError(f"method.train_size={n} must be in 1..{len(train)} (the training examples) or -1 for all")
        keep = low_resource_rows(np.asarray(train["label"]), n, int(ctx.seed), bool(ctx.task.is_regression))
        log.info("weight_mixup: %d of %d training examples (train_size)", n, len(train))
        return train.select(keep)

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        """Stage 2: AdamW over W (alpha and W0 frozen); lr/weight decay from method.stage2 or the trainer."""
        lr = self.stage2["lr"] if self.stage2["lr"] is not None else trainer.lr
        wd = self.stage2["weight_decay"] if self.stage2["weight_decay"] is not None else trainer.weight_decay
        return adamw(decay_groups(self.inner_params(model), wd), float(lr), next(model.parameters()).device)

    # --- stage 1 ----------------------------------------------------------------------------------
    def stages(self) -> list[ModelStage]:
        return [ModelStage("bilevel", self.run_stage1)]

    def run_stage1(self, model: nn.Module, train: Dataset, loop: LoopHandle) -> None:
        """Stage 1 (what a resumed run has left of it), then alpha frozen for stage 2 (W0 is a buffer)."""
        self.bilevel.run(model, train, loop)
        for a in self.alphas():
            a.requires_grad_(False)

    # --- reporting ---------------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """Stage-1 cost on top of the loop's (runner convention: cost/total_* cover all training compute)."""
        flops_per_token = 6 * count_params(self._model, non_embedding=True)  # as the loop's cost/train_flops
        stage = self.bilevel
        return {
            "stage1/outer_steps": stage.outer_steps,
            "stage1/wall_s": stage.wall_s,
            "stage1/tokens": stage.tokens,
            "cost/total_flops": train_metrics["cost/train_flops"] + flops_per_token * stage.tokens,
            "cost/total_wall_s": train_metrics["train/wall_s"] + stage.wall_s,
        }

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stage-1 progress, and W, a1, a2, W0 of every mixed layer (the checkpoint holds only Weff)."""
        mixed = {n: {"weight": m.weight, "a1": m.a1, "a2": m.a2, "weight0": m.weight0} for n, m in self.mixed.items()}
        return {**self.bilevel.state_dict(), "mixed": mixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        with torch.no_grad():
            for n, tensors in state["mixed"].items():
                m = self.mixed[n]
                for key in ("weight", "a1", "a2", "weight0"):
                    getattr(m, key).copy_(tensors[key])
        self.bilevel.load_state_dict(state)
