"""Flooding (Ishida et al., ICML 2020): keep the training loss near a flood level b instead of zero.

    loss_flood = |loss - b| + b

Above b this is plain ERM; below b the gradient flips sign, so the model stops driving the training loss
to zero (gradient ascent on the mini-batch). The paper applies it to the mini-batch mean loss, as here.
It is the worked example of README "Adding a method": one module, one YAML, one hook.
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.methods.base import Method, StepOutput, task_loss


class Flooding(Method):
    def __init__(self, name: str, level: float) -> None:
        super().__init__(name)
        self.level = float(level)  # b; the default lives in conf/method/flooding.yaml

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, batch)
        loss = task_loss(logits, batch["labels"], self.ctx.task.is_regression)
        flooded = (loss - self.level).abs() + self.level
        # below the flood level the step ascends: log how often (a device tensor; the loop syncs at log time)
        return StepOutput(flooded, logits.detach(), logs={"flood/below": (loss < self.level).float()})
