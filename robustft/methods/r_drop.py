"""R-Drop (Liang et al., NeurIPS 2021; official code dropreg/R-Drop): two dropout sub-networks, kept consistent.

Every training batch goes through the model twice with dropout on, as ONE forward of the batch
concatenated with itself (each row draws its own dropout masks, so the two halves are two sub-networks);
the loss is

    loss = (L(z1) + L(z2)) / 2 + (alpha / 2) * D(z1, z2)

with L the task loss (cross-entropy; MSE for regression) and D the symmetric divergence between the two
predictions: D = (KL(p1 || p2) + KL(p2 || p1)) / 2 averaged over the batch (p = softmax(z)); for
regression D = MSE(z1, z2). `rdrop/kl` logs D.

Departures from the official code (commented where they happen):
- Scale: the paper and the official criteria sum the two task losses, L(z1) + L(z2) + alpha * D; this is
  half of that, so that alpha = 0 is exactly the mean task loss of the two passes (same scale as vanilla
  fine-tuning for the trainer's gradient clipping and learning rate). alpha keeps the official meaning
  (the ratio between the KL and the task terms is the same).
- Reduction: per-example KL averaged over the batch, as the fairseq criterion for RoBERTa on GLUE
  (`reg_sentence_prediction`: everything summed over the batch, then divided by the batch size). The
  HuggingFace BERT code (`bert_kl`) instead sums the KL over the batch and adds it to batch-mean CE
  terms with a hard-coded 0.5 * (KL + reverse KL) / 2, which makes the KL weight grow with the batch size.
- Regression: both passes' MSE to the target, as the HuggingFace code; the fairseq criterion uses the
  first pass only.
- The two passes are one concatenated forward (the official code runs two forwards): the same
  computation, one kernel launch per layer instead of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, StepOutput, TrainContext, task_loss
from robustft.methods.stats import LogWindow


def rdrop_divergence(logits1: torch.Tensor, logits2: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """D: (KL(p1||p2) + KL(p2||p1)) / 2, batch mean (fp32); MSE between the two outputs for regression."""
    if is_regression:
        return F.mse_loss(logits1.float().squeeze(-1), logits2.float().squeeze(-1))
    lp1, lp2 = F.log_softmax(logits1.float(), -1), F.log_softmax(logits2.float(), -1)
    kl12 = F.kl_div(lp2, lp1, reduction="batchmean", log_target=True)  # KL(p1 || p2)
    kl21 = F.kl_div(lp1, lp2, reduction="batchmean", log_target=True)  # KL(p2 || p1)
    return 0.5 * (kl12 + kl21)


def rdrop_loss(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, alpha: float,
               is_regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, D) for the two passes' logits (see the module docstring)."""
    task = 0.5 * (task_loss(logits1, labels, is_regression) + task_loss(logits2, labels, is_regression))
    div = rdrop_divergence(logits1, logits2, is_regression)
    # official: L1 + L2 + alpha * D; halved here (see the docstring), hence alpha / 2
    return task + 0.5 * alpha * div, div


class RDrop(Method):
    """R-Drop: mean task loss of two dropout passes plus alpha/2 times their symmetric KL."""

    def __init__(self, name: str, alpha: float) -> None:
        super().__init__(name)
        if float(alpha) < 0:
            raise UserError(f"method.alpha={alpha} must be >= 0 (the weight of the KL term; 0 = two-pass mean CE)")
        self.alpha = float(alpha)
        self.window = LogWindow(1)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.window = LogWindow(int(ctx.trainer.log_every))
        return super().setup(model, ctx)

    def flops_factor(self) -> float:
        return 2.0  # the doubled batch

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        n = batch["labels"].shape[0]
        doubled = {k: torch.cat([v, v]) for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (n,)}
        logits = self.forward(model, doubled)  # one forward of both copies: each row its own dropout masks
        logits1, logits2 = logits[:n], logits[n:]
        loss, div = rdrop_loss(logits1, logits2, batch["labels"], self.alpha, self.ctx.task.is_regression)
        self.window.add(torch.stack([torch.ones((), device=div.device), div.detach()]))
        return StepOutput(loss, logits1.detach())

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        logs = super().optimizer_step(optimizer, model)
        sums = self.window.flush()  # after the loop's loss.item(): no extra sync
        if sums is None:
            return logs
        n, div = sums
        return {**logs, "rdrop/kl": div / n}  # D averaged over the micro-batches since the last train row

    def state_dict(self) -> dict:
        return {"window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "window" in state:
            self.window.load_state_dict(state["window"], self.ctx.device if self.ctx else None)
