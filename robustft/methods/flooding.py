"""Flooding (Ishida et al., ICML 2020): keep the training loss near a flood level b instead of zero.

    loss_flood = |loss - b| + b

Above b this is plain ERM; below b the gradient flips sign, so the model stops driving the training loss
to zero (gradient ascent on the mini-batch). The paper applies it to the mini-batch mean loss, as here.
It is the worked example of README "Adding a method": one module, one YAML, one hook.

Data parallel (robustft/distributed.py): the flood acts on the global batch's mean loss, as in one
process: the ranks sum (loss x examples, examples) in one all-reduce of two numbers, and each rank returns
sign(global - b) (loss_r - b) + b, whose gradient, averaged over the ranks by DDP, is the single-process
one; `flood/below` is then the global batch's on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from robustft import distributed
from robustft.methods.base import Method, StepOutput, task_loss


class Flooding(Method):
    def __init__(self, name: str, level: float) -> None:
        super().__init__(name)
        self.level = float(level)  # b; the default lives in conf/method/flooding.yaml

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, batch)
        loss = task_loss(logits, batch["labels"], self.ctx.task.is_regression)
        if distributed.world_size() > 1:
            return self.global_flood(loss, logits, batch["labels"].shape[0])
        flooded = (loss - self.level).abs() + self.level
        # below the flood level the step ascends: log how often (a device tensor; the loop syncs at log time)
        return StepOutput(flooded, logits.detach(), logs={"flood/below": (loss < self.level).float()})

    def global_flood(self, loss: torch.Tensor, logits: torch.Tensor, n: int) -> StepOutput:
        """Under data parallelism: the flood's sign from the global batch's mean loss (no host sync)."""
        sums = distributed.all_reduce_sum(torch.stack([loss.detach().float() * n, torch.full_like(loss, n).float()]))
        mean = sums[0] / sums[1]
        flooded = torch.sign(mean - self.level).to(loss.dtype) * (loss - self.level) + self.level
        return StepOutput(flooded, logits.detach(), logs={"flood/below": (mean < self.level).float()})
