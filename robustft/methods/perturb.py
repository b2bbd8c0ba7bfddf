"""Shared pieces of the embedding-perturbation methods (method=r3f/r4f, smart, freelb).

All three perturb the word embeddings e = E[input_ids] (the output of `model.get_input_embeddings()`, before
position/type embeddings and LayerNorm, as fairseq's `embed_tokens` in R3F and FreeLB's
`word_embeddings`) and run the model again with `inputs_embeds=e + delta`. Here:
- `word_embeddings` / `embeds_forward`: the perturbed forward for any family (BERT/MiniLM, RoBERTa,
  DeBERTa-v2/v3): attention_mask and token_type_ids come from the batch, input_ids are replaced.
- `symmetric_kl` / `divergence`: KL(p||q) + KL(q||p) in fp32, summed over classes, averaged over the batch
  (fairseq R3F's sum / batch size; MT-DNN's `batchmean`); MSE for regression.
- `norm` / `normalize` / `project`: norms over a group of dimensions (per token for SMART, per example
  for FreeLB), the normalised ascent direction and the projection onto the norm ball.
- `PerturbationMethod`: the common Method part: logging statistics averaged over the metrics.jsonl
  window (LogWindow, on device), the plain optimizer step, the window in the resume state.

Evaluation (`predict`) is the base Method's clean forward for all of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, model_inputs
from robustft.methods.stats import LogWindow

NORMS = ("inf", "l2")
TINY = torch.finfo(torch.float32).tiny  # default floor of a norm before dividing by it (0 stays 0)


def word_embeddings(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """E[input_ids]: what HF models compute from input_ids, and what `inputs_embeds` replaces."""
    return model.get_input_embeddings()(batch["input_ids"])


def embeds_forward(model: nn.Module, batch: dict[str, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """Logits of the model run on `embeds` in place of the word embeddings of `batch`.

    With embeds = word_embeddings(model, batch) this is the plain forward (RoBERTa numbers positions
    from `inputs_embeds` without skipping padding; with right padding the real tokens' positions, and so the
    logits, are the same).
    """
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
    return model(inputs_embeds=embeds, **inputs).logits


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, detach_targets: bool = False) -> torch.Tensor:
    """KL(p||q) + KL(q||p), summed over classes and averaged over the batch, in fp32.

    detach_targets=False: the gradient flows through both distributions in both terms (fairseq R3F's
    `_get_symm_kl`). True: each term's target distribution is a constant, so KL(p||q) trains q and
    KL(q||p) trains p (MT-DNN's `SymKlCriterion`, used by SMART).
    """
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    tp, tq = (lp.detach(), lq.detach()) if detach_targets else (lp, lq)
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q) = KL(p||q)
    return (F.kl_div(lq, tp, reduction="batchmean", log_target=True)
            + F.kl_div(lp, tq, reduction="batchmean", log_target=True))


def divergence(logits_p: torch.Tensor, logits_q: torch.Tensor, is_regression: bool,
               detach_targets: bool = False) -> torch.Tensor:
    """`symmetric_kl` for classification; for regression the mean squared difference (MT-DNN's MseCriterion)."""
    if is_regression:
        return F.mse_loss(logits_p.float().squeeze(-1), logits_q.float().squeeze(-1))
    return symmetric_kl(logits_p, logits_q, detach_targets)


def norm(x: torch.Tensor, p: str, dims: tuple[int, ...]) -> torch.Tensor:
    """The inf- or l2-norm of x over `dims` (kept as size-1 dimensions, so it broadcasts against x), in fp32."""
    if p == "inf":
        return x.float().abs().amax(dim=dims, keepdim=True)
    return torch.linalg.vector_norm(x.float(), 2, dim=dims, keepdim=True)


def normalize(g: torch.Tensor, p: str, dims: tuple[int, ...], floor: float = TINY) -> torch.Tensor:
    """g / max(||g||, floor) over `dims` (a zero group stays zero).

    The default floor only guards 0 / 0: SMART's ascent gradient at a perturbation of 1e-5 can have norms
    far below 1e-8, and its direction is what matters.
    """
    return (g.float() / norm(g, p, dims).clamp_min(floor)).to(g.dtype)


def project(delta: torch.Tensor, p: str, radius: float, dims: tuple[int, ...]) -> torch.Tensor:
    """The closest point of the ball ||delta|| <= radius (per group over `dims`); radius 0 = no projection.

    inf: clamp every entry to [-radius, radius] (the inf-ball of any group); l2: rescale the groups whose
    norm exceeds the radius (FreeLB's `reweights`).
    """
    if radius <= 0:
        return delta
    if p == "inf":
        return delta.clamp(-radius, radius)
    scale = (radius / norm(delta, "l2", dims).clamp_min(TINY)).clamp(max=1.0)
    return delta * scale.to(delta.dtype)


def check_norm(option: str, value: str) -> str:
    if value not in NORMS:
        raise UserError(f"method.{option}={value!r}: choose inf or l2")
    return value


def check_nonnegative(**options: float) -> None:
    for key, value in options.items():
        if float(value) < 0:
            raise UserError(f"method.{key}={value} must be >= 0")


class PerturbationMethod(Method):
    """Common part of r3f/r4f, smart and freelb: statistics named `log_names`, averaged per micro-batch.

    A subclass calls `record(v1, v2, ...)` (0-d device tensors, one per name) in its training step; the
    optimizer step returns their means over the micro-batches since the last train row.
    """

    log_names: tuple[str, ...] = ()

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.window = LogWindow(1)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().setup(model, ctx)
        if not isinstance(getattr(model, "get_input_embeddings", lambda: None)(), nn.Embedding):
            raise UserError(f"method={self.name} perturbs the word embeddings; {type(model).__name__} has no "
                            "get_input_embeddings() embedding layer (use a Hugging Face transformer model)")
        self.window = LogWindow(int(ctx.trainer.log_every))
        return model

    def record(self, *values: torch.Tensor) -> None:
        one = torch.ones((), device=values[0].device)
        self.window.add(torch.stack([*(v.detach().float() for v in values), one]))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        optimizer.step()
        return self.step_logs()

    def step_logs(self) -> dict[str, float]:
        sums = self.window.flush()
        if sums is None:
            return {}
        *values, n = sums
        return {name: v / n for name, v in zip(self.log_names, values)}

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "window" in state:
            self.window.load_state_dict(state["window"], self.ctx.device if self.ctx else None)
