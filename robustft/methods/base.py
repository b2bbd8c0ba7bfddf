"""The method interface. `Method` itself is ERM; robust methods override a few hooks.

The runner (robustft/runner.py) and the loop (robustft/loop.py) call, in order:
  setup(model, ctx)            -> model      wrap/modify the model (e.g. add layers)
  stages()                     -> [stage]    what must run before the main training: a RunStage (FTFT's
  stage_done(result)                         reference run; the runner runs it and hands back its StageResult)
                                             or a ModelStage (weight mixup's stage 1, run by the loop on the
                                             model after a resume restored state, before the first step)
  train_data(train, ctx)       -> Dataset    change the training data (selection, stresses)
  files() / run_info()         -> dict       records the runner writes into the run directory / run_info.json
  configure_optimizer(model)   -> optimizer
  per batch: training_step(model, batch) -> StepOutput   (the loop calls loss.backward())
  per optimizer step: optimizer_step(optimizer, model) -> logs (after clipping, before scheduler)
  predict(model, batch)        -> logits     evaluation forward
  state_dict()/load_state_dict()             anything the method must carry across a resume
  metrics(train_metrics)       -> dict       extra final metrics after training (e.g. ftft's reference cost)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from omegaconf import DictConfig
from torch import nn

from robustft.stages import ModelStage, RunStage, StageResult


@dataclass
class TrainContext:
    """What a method may need to know about the run."""

    task: DictConfig
    trainer: DictConfig
    device: torch.device
    seed: int
    tokenizer: Any = None


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)  # scalars written to metrics.jsonl train rows


@dataclass
class LoopHandle:
    """What a `ModelStage` may use of the loop."""

    log: Callable[[dict[str, Any]], None]  # append a metrics.jsonl row
    save: Callable[[], None]  # write checkpoints/last (method state, RNG, progress); a resume continues from it
    amp: torch.dtype | None = None  # the run's autocast dtype (None = fp32)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the HF model takes (labels and idx stay with the loop)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression (STS-B); computed in fp32."""
    if is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def no_decay(name: str) -> bool:
    """Biases and LayerNorm weights get no weight decay (BERT convention, as in HF Trainer)."""
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "layernorm" in name


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `weight_decay` for the weights, none where `no_decay` says so."""
    named = list(named_params)
    return [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": float(weight_decay)},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and CPU (torch >= 2.4).

    torch's CPU default is the single-tensor loop: scripts/bench_train.py measured its step about 5x slower
    than the fused kernel for minilm, which alone made a training step ~30% slower than HF Trainer's.
    """
    fused = device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


class Method:
    """Vanilla fine-tuning (empirical risk minimisation)."""

    def __init__(self, name: str = "vanilla", **options: Any) -> None:
        self.name = name
        self.options = options
        self.ctx: TrainContext | None = None

    # --- set-up hooks -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.ctx = ctx
        return model

    def stages(self) -> list[RunStage | ModelStage]:
        """What this method needs before its main training (robustft/stages.py); the runner runs it."""
        return []

    def stage_done(self, result: StageResult) -> None:
        """The artifacts of a finished (or reused) stage: its folder and metrics."""

    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        return train

    def files(self) -> dict[str, Any]:
        """Files for the run directory, by relative name (a JSON object, or a list of rows for `.jsonl`).

        Methods never write into the run directory themselves: the runner hands these to `RunDir`.
        """
        return {}

    def run_info(self) -> dict[str, Any]:
        """Fields the runner merges into run_info.json after `train_data` (e.g. what was selected)."""
        return {}

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return adamw(decay_groups(named, trainer.weight_decay), float(trainer.lr), next(model.parameters()).device)

    # --- per-step hooks -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch)).logits

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, batch)
        return StepOutput(task_loss(logits, batch["labels"], self.ctx.task.is_regression), logits.detach())

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        optimizer.step()
        return {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch)).logits

    # --- final metrics ------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """Extra metrics merged into metrics.json after training; gets the loop's train/ and cost/ metrics.

        A method whose run spends training compute outside the loop (ftft's reference model) reports
        `cost/total_flops` here; otherwise the runner sets it to `cost/train_flops`.
        """
        return {}

    # --- state carried across a resume --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
