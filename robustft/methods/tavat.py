"""TAVAT (Li & Qiu, AAAI 2021, "Token-Aware Virtual Adversarial Training in Natural Language Understanding";
official code LinyangLee/Token-Aware-VAT token_vat.py, the same loop in RockyLzy/TextDefender trainer/tavat.py).

FreeLB-style ascent with two perturbations of the word embeddings e:
- delta_lb, a per-batch one, started as FreeLB's (zero on padding, U(-1, 1) * adv_init_mag / sqrt(L_i d));
- delta_tok = V[input_ids] / ||V[input_ids]||, read from a global perturbation vocabulary V (vocab x hidden,
  started at U(-1, 1) * adv_init_mag / sqrt(d)); the norm is the Frobenius norm of the whole batch's rows.
Step t = 1..K: loss_t = L(f(e + delta_lb + delta_tok), y); the parameter gradients of all K losses are summed
(the official `loss.backward(retain_graph=True)` each step, no division by K). Between steps:

    delta_lb  += adv_lr * g_lb / ||g_lb||          (norm per example)
    delta_tok += adv_lr * g_tok / ||g_tok||        (norm per token)
    delta_tok *= ||delta_tok||_token / max_tokens ||delta_tok||_token    (the token-aware reweighting)
    both *= adv_max_norm / ||delta_lb + delta_tok||  where that per-example norm exceeds adv_max_norm

After the last step the vocabulary accumulates it: V[input_ids] += delta_tok (`index_put_(accumulate=True)`,
one addition per occurrence, padding included, as the official). V is method state: it is saved with every
checkpoint and a resume continues from it. Dropout is redrawn at every step (a plain model, as the official).
The value handed to the loop is the sum of the K losses (the official `tr_loss`), so `train/loss` is about K
times the cross-entropy.

Departures: V starts from a generator seeded with the run seed (the official draws it from the global RNG
after `set_seed`); adv_max_norm = 0 means no projection (TextDefender's guard; token_vat.py always
projects, so 0 would zero delta); the reweighting divides by max(.., tiny) (an all-zero example stays zero,
official 0 / 0). Data parallel: V would be updated from each rank's shard, so the method runs in one process
only (a one-line error under torchrun).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustft import distributed
from robustft.errors import UserError
from robustft.methods.base import StepOutput, TrainContext, task_loss
from robustft.methods.freelb import EXAMPLE, _WithGrads, init_delta
from robustft.methods.perturb import (
    TINY,
    PerturbationMethod,
    check_nonnegative,
    embeds_forward,
    norm,
    normalize,
    word_embeddings,
)

TOKEN = (-1,)


def token_aware_update(lb: torch.Tensor, tok: torch.Tensor, g_lb: torch.Tensor, g_tok: torch.Tensor, adv_lr: float,
                       max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One official ascent step on (delta_lb, delta_tok): normalised steps, token reweighting, joint projection."""
    lb = lb + adv_lr * normalize(g_lb, "l2", EXAMPLE, floor=1e-8)
    tok = tok + adv_lr * normalize(g_tok, "l2", TOKEN, floor=1e-8)
    sizes = norm(tok, "l2", TOKEN)  # B x L x 1
    tok = tok * (sizes / sizes.amax(dim=1, keepdim=True).clamp_min(TINY)).to(tok.dtype)
    if max_norm > 0:  # the joint projection: both parts rescaled by the factor that projects their sum
        scale = (max_norm / norm(lb + tok, "l2", EXAMPLE).clamp_min(TINY)).clamp(max=1.0)
        lb, tok = lb * scale.to(lb.dtype), tok * scale.to(tok.dtype)
    return lb, tok


class TAVAT(PerturbationMethod):
    """K token-aware ascent steps, gradients of all K losses summed, a global perturbation vocabulary."""

    log_names = ("tavat/delta_norm",)

    def __init__(self, name: str, adv_steps: int, adv_lr: float, adv_init_mag: float, adv_max_norm: float) -> None:
        super().__init__(name)
        check_nonnegative(adv_lr=adv_lr, adv_init_mag=adv_init_mag, adv_max_norm=adv_max_norm)
        if int(adv_steps) < 1:
            raise UserError(f"method.adv_steps={adv_steps} must be >= 1")
        self.adv_steps, self.adv_lr = int(adv_steps), float(adv_lr)
        self.adv_init_mag, self.adv_max_norm = float(adv_init_mag), float(adv_max_norm)
        self.vocab: torch.Tensor | None = None  # V, vocab x hidden, fp32 on the device
        self.params: list[nn.Parameter] | None = None
        self.delta: torch.Tensor | None = None  # the last step's delta_lb + delta_tok (inspected by tests)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if distributed.world_size() > 1:
            raise UserError(f"method=tavat keeps one perturbation vocabulary updated from every batch and runs in "
                            f"one process only, this run has {distributed.world_size()}; run it single-process "
                            "(no torchrun, SLURM tasks_per_node=1)")
        model = super().setup(model, ctx)
        emb = model.get_input_embeddings()
        g = torch.Generator().manual_seed(int(ctx.seed))
        v = torch.empty(emb.num_embeddings, emb.embedding_dim).uniform_(-1.0, 1.0, generator=g)
        self.vocab = (v * (self.adv_init_mag / emb.embedding_dim ** 0.5)).to(ctx.device)
        return model

    def flops_factor(self) -> float:
        return float(self.adv_steps)  # K forward + backward passes

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.params is None:
            self.params = [p for p in model.parameters() if p.requires_grad]
        regression, labels, ids = self.ctx.task.is_regression, batch["labels"], batch["input_ids"]
        embeds = word_embeddings(model, batch)
        lb = init_delta(embeds, batch["attention_mask"], self.adv_init_mag, "l2")
        tok = self.vocab[ids]
        tok = (tok / torch.linalg.vector_norm(tok).clamp_min(TINY)).to(embeds.dtype)
        used, buffer, earlier, first = [], None, [], None
        for t in range(self.adv_steps):
            if t:
                embeds = word_embeddings(model, batch)
            last = t == self.adv_steps - 1
            lb.requires_grad_(not last)
            tok.requires_grad_(not last)
            logits = embeds_forward(model, batch, embeds + lb + tok)
            loss = task_loss(logits, labels, regression)
            first = logits.detach() if first is None else first
            if last:
                break
            grads = torch.autograd.grad(loss, [lb, tok, *self.params], allow_unused=True)
            if buffer is None:
                used = [p for p, g in zip(self.params, grads[2:]) if g is not None]
                buffer = [g for g in grads[2:] if g is not None]
            else:
                torch._foreach_add_(buffer, [g for g in grads[2:] if g is not None])
            earlier.append(loss.detach())
            lb, tok = token_aware_update(lb.detach(), tok.detach(), grads[0], grads[1], self.adv_lr, self.adv_max_norm)
        with torch.no_grad():
            self.vocab.index_put_((ids.reshape(-1),), tok.detach().reshape(-1, tok.shape[-1]).float(), accumulate=True)
        self.delta = (lb + tok).detach()
        self.record(norm(self.delta, "l2", EXAMPLE).mean())
        if buffer is not None:
            loss = _WithGrads.apply(loss + torch.stack(earlier).sum(), buffer, *used)
        return StepOutput(loss, first)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vocab": self.vocab}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("vocab") is not None:
            self.vocab = state["vocab"].to(self.ctx.device if self.ctx else None)
