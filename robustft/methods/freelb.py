"""FreeLB (Zhu et al., ICLR 2020, "FreeLB: Enhanced Adversarial Training for Natural Language Understanding";
official code zhuchen03/FreeLB huggingface-transformers/examples/run_glue_freelb.py).

K ascent steps on a perturbation delta of the word embeddings e, the parameter gradients accumulated over
them (a "free" large batch of K adversarial copies):

    grad = sum_{t=1..K} grad_theta L(f(e + delta_{t-1}), y) / K
    delta_t = Proj_{||.|| <= adv_max_norm}(delta_{t-1} + adv_lr * g_t / ||g_t||),   g_t = grad_delta L(f(e + delta_{t-1}), y)

norms per example (over tokens x hidden), l2 (official default) or linf. delta_0 is zero on padding and
uniform elsewhere: l2: U(-1, 1) * adv_init_mag / sqrt(L_i * d) (L_i real tokens of example i, d hidden size);
linf: U(-adv_init_mag, adv_init_mag); adv_init_mag = 0: delta_0 = 0. adv_max_norm = 0: no projection. The K
forwards use the same dropout masks, all of them (here torch's RNG state is replayed), and each recomputes e
so the word-embedding matrix gets its gradient from every step.

Dropout masks in the two official implementations: fairseq-RoBERTa (`freelb_train_step`, `init_dp=False`
after the first step unless `--no-sync-dp`) stores and reuses every mask, the embedding dropout's included:
what this module does. The HF-ALBERT code (run_glue_freelb.py, modeling_albert.py), whose defaults the YAML
takes, passes `dp_masks` for the encoder layers and the classifier only: `AlbertEmbeddings.dropout` is a
plain nn.Dropout, so the embedding dropout is redrawn at every ascent step there. A departure from that code,
documented rather than matched: matching it needs a second RNG stream inside the replayed forward.

How the gradients end up the official ones: the loop back-propagates only what `training_step` returns, and
scales it by 1 / (micro-batches in the optimizer step), which the method does not know. So the K - 1 first
steps take their gradients with `torch.autograd.grad` (parameters and delta; .grad untouched), summed in a
buffer; the returned loss is the last step's loss / K wrapped in `_WithGrads`, an identity whose backward also
hands `incoming gradient * buffer` to the parameters. The loop's backward thus adds
(sum_t grad L_t / K) / len(group) to .grad, exactly the official accumulation under any gradient
accumulation. The returned value is the mean of the K losses (the official `tr_loss`).

Departures: none in the update (the embedding-dropout mask above aside); the logits handed to the loop (training dynamics) are the first step's
(e + delta_0). Option names are the official flags (`--adv-lr` -> adv_lr, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.checkpoint import set_torch_rng_state, torch_rng_state
from robustft.errors import UserError
from robustft.methods.base import StepOutput, task_loss
from robustft.methods.perturb import (
    PerturbationMethod,
    check_nonnegative,
    embeds_forward,
    norm,
    normalize,
    project,
    word_embeddings,
)

EXAMPLE = (1, 2)  # norms per example: over tokens and hidden units
NORM_TYPES = {"l2": "l2", "linf": "inf"}


def set_ascent_options(method: object, adv_steps: int, adv_lr: float, adv_init_mag: float, adv_max_norm: float,
                       norm_type: str, steps_why: str) -> None:
    """Check and set the options of a K-step ascent on a word-embedding ball (FreeLB, PGD-K, InfoBERT): one place
    for the checks they share; `steps_why` ends the adv_steps message (each method's own reason)."""
    check_nonnegative(adv_lr=adv_lr, adv_init_mag=adv_init_mag, adv_max_norm=adv_max_norm)
    if int(adv_steps) < 1:
        raise UserError(f"method.adv_steps={adv_steps} must be >= 1 ({steps_why})")
    if norm_type not in NORM_TYPES:
        raise UserError(f"method.norm_type={norm_type!r}: choose l2 or linf")
    method.adv_steps, method.adv_lr = int(adv_steps), float(adv_lr)
    method.adv_init_mag, method.adv_max_norm, method.norm_type = float(adv_init_mag), float(adv_max_norm), norm_type


class _WithGrads(torch.autograd.Function):
    """Identity on `loss`; its backward also gives each of `params` the gradient `incoming * grads[i]`."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, grads: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, incoming: torch.Tensor):
        return (incoming, None, *torch._foreach_mul(ctx.grads, incoming))


def init_delta(embeds: torch.Tensor, mask: torch.Tensor, init_mag: float, norm_type: str) -> torch.Tensor:
    """delta_0 as the official code: zero on padding; l2: U(-1,1) * mag / sqrt(L_i d); linf: U(-mag, mag)."""
    if init_mag <= 0:
        return torch.zeros_like(embeds)
    m = mask.to(torch.float32).unsqueeze(-1)
    u = torch.empty(embeds.shape, device=embeds.device, dtype=torch.float32).uniform_(-1.0, 1.0)
    if norm_type == "l2":
        scale = init_mag / torch.sqrt(m.sum(dim=(1, 2), keepdim=True) * embeds.shape[-1])
    else:
        scale = init_mag
    return (u * m * scale).to(embeds.dtype)


def ascent_update(delta: torch.Tensor, grad: torch.Tensor, adv_lr: float, max_norm: float, norm_type: str) -> torch.Tensor:
    """delta + adv_lr * g / ||g|| (per example), projected onto ||delta|| <= max_norm (0 = no projection)."""
    p = NORM_TYPES[norm_type]
    return project(delta + adv_lr * normalize(grad, p, EXAMPLE, floor=1e-8), p, max_norm, EXAMPLE)  # official clamp


class FreeLB(PerturbationMethod):
    """K adversarial ascent steps on the word embeddings, parameter gradients accumulated over all of them."""

    log_names = ("freelb/delta_norm",)

    def __init__(self, name: str, adv_steps: int, adv_lr: float, adv_init_mag: float, adv_max_norm: float,
                 norm_type: str) -> None:
        super().__init__(name)
        set_ascent_options(self, adv_steps, adv_lr, adv_init_mag, adv_max_norm, norm_type,
                           "official: 'should be at least 1'")
        self.params: list[nn.Parameter] | None = None
        self.delta: torch.Tensor | None = None  # the last step's perturbation (logged; inspected by tests)

    def flops_factor(self) -> float:
        return float(self.adv_steps)  # K forward + backward passes, none on the clean input

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.params is None:
            self.params = [p for p in model.parameters() if p.requires_grad]
        steps, regression, labels = self.adv_steps, self.ctx.task.is_regression, batch["labels"]
        embeds = word_embeddings(model, batch)
        delta = init_delta(embeds, batch["attention_mask"], self.adv_init_mag, self.norm_type)
        rng = torch_rng_state(embeds.device)
        used, buffer, earlier, first = [], None, [], None
        for t in range(steps):
            if t:  # the same dropout masks as the first step; a fresh graph of e for this step's backward
                set_torch_rng_state(rng, embeds.device)
                embeds = word_embeddings(model, batch)
            last = t == steps - 1
            delta.requires_grad_(not last)
            logits = embeds_forward(model, batch, embeds + delta)
            loss = task_loss(logits, labels, regression) / steps
            first = logits.detach() if first is None else first
            if last:
                break
            grads = torch.autograd.grad(loss, [delta, *self.params], allow_unused=True)
            if buffer is None:  # parameters outside the graph (if any) keep no gradient, as in a plain backward
                used = [p for p, g in zip(self.params, grads[1:]) if g is not None]
                buffer = [g for g in grads[1:] if g is not None]
            else:
                torch._foreach_add_(buffer, [g for g in grads[1:] if g is not None])
            earlier.append(loss.detach())
            delta = ascent_update(delta.detach(), grads[0], self.adv_lr, self.adv_max_norm, self.norm_type)
        self.delta = delta.detach()
        self.record(norm(self.delta, "l2", EXAMPLE).mean())
        if buffer is not None:
            loss = _WithGrads.apply(loss + torch.stack(earlier).sum(), buffer, *used)
        return StepOutput(loss, first)
