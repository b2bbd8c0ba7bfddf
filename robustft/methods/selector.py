"""`Selector`: a method that wraps another one (`selector=<name>` around any `method=...`).

A selector changes *which* parameters an optimizer step moves (ROSE's per-tensor masks, Child-Tuning's
per-entry gradient masks) and leaves everything else to the method it wraps: the runner builds the
method from `conf/method/`, then the selector from `conf/selector/` with `inner=<that method>`
(robustft/runner.py `build_method`). This base class forwards every hook to `self.inner`, so a selector
overrides only the hooks it changes and calls `super()` for the rest; a hook a selector does not know
about still reaches the wrapped method (e.g. its stages, its extra metrics, its resume state).

Subclasses set `self.inner` in `__init__` (and name themselves `<inner>+<selector>`, see `wrapped_name`).
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from omegaconf import DictConfig
from torch import nn

from robustft.methods.base import Method, StepOutput, TrainContext
from robustft.stages import ModelStage, RunStage, StageResult


def wrapped_name(name: str, inner: Method | None) -> str:
    """`match_tuning+rose` for a selector around a method; the selector's own name when it is the method."""
    return name if inner is None else f"{inner.name}+{name}"


class Selector(Method):
    """Delegates every hook to the wrapped method `self.inner`."""

    inner: Method
    runtime_args = frozenset({"inner"})  # the runner passes the wrapped method; no YAML sets it

    # --- set-up hooks -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.ctx = ctx
        return self.inner.setup(model, ctx)

    def stages(self) -> list[RunStage | ModelStage]:
        return self.inner.stages()  # e.g. a method's reference run or its own stage before the loop

    def stage_done(self, result: StageResult) -> None:
        self.inner.stage_done(result)

    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        return self.inner.train_data(train, ctx)

    def files(self) -> dict[str, Any]:
        return self.inner.files()

    def run_info(self) -> dict[str, Any]:
        return self.inner.run_info()

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        return self.inner.configure_optimizer(model, trainer)

    # --- per-step hooks -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.forward(model, batch)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.inner.training_step(model, batch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        return self.inner.optimizer_step(optimizer, model)

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.predict(model, batch)

    # --- cost and final metrics -----------------------------------------------------------------
    def flops_factor(self) -> float:
        return self.inner.flops_factor()

    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        return self.inner.metrics(train_metrics)

    # --- state carried across a resume --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped method's state under `inner`; a subclass adds its own keys beside it."""
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
