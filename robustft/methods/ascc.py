"""ASCC (Dong et al., "Towards Robustness Against Natural Language Word Substitutions", ICLR 2021;
dongxinshuai/ASCC): adversarial training in the convex hull of each word's substitution set.

For every position the adversarial word embedding is sum_j p_j E[s_j] over its set S = {word} + its
neighbours (p on the simplex, zero off the set), with p found by the official `get_adv_by_convex_syn` (model in
eval mode, `loss_func='kl'`, `out_type='comb_p'`):

    w ~ kaiming_normal (B, L, S, 1);  Adam(w, lr=w_lr, weight_decay=w_weight_decay), attack_steps times:
    ww = w * valid + 500 * (valid - 1);  p = softmax(ww over S);  e_adv = sum_j p_j E[s_j]
    minimise  -KL_sum(softmax(f(e)) || softmax(f(e_adv))) + sparse_weight * mean entropy(p)
    then      loss = CE(f(e), y) + beta * KL_batchmean(softmax(f(e)) || softmax(f(e_adv)))   (TextDefender ascc.py)

with f(e_adv) recomputed from the embedding matrix (its gradient trains the synonyms' embeddings, as the
official `text_syn_p_to_logit`). Defaults: ASCC's BERT run (`train_attack_iters` 10, `bert_w_optm_lr` 1,
`train_attack_sparse_weight` 15, Adam weight decay 2e-5, `certified_neighbors_file_path`
counterfitted_neighbors.json) and TextDefender's `--beta 4`.

Departures: the hull is over the word embeddings (before position/type embeddings and LayerNorm; the official
BERT's `text_to_embd`), substitution sets are whole WordPiece tokens with one-token neighbours (SAFER's sets,
robustft/methods/safer.py); the attack's gradients are taken with `torch.autograd.grad` on w only (the
official calls `loss.backward()` and zeroes the model's gradients afterwards; the loop here accumulates them
across micro-batches). Classification only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, StepOutput, TrainContext, task_loss
from robustft.methods.perturb import embeds_forward
from robustft.methods.safer import neighbour_slots, wordpiece_sets


def comb_p(w: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax weights over each set, their logits ww): off-set entries pushed to -500 (exactly 0 in fp32)."""
    v = valid.unsqueeze(-1).to(w.dtype)
    ww = w * v + 500 * (v - 1)
    return F.softmax(ww, -2), ww


class ASCC(Method):
    """Adversarial training on convex combinations of each word's substitutes (see the module docstring)."""

    def __init__(self, name: str, path: str, beta: float, attack_steps: int, w_lr: float, w_weight_decay: float,
                 sparse_weight: float) -> None:
        super().__init__(name)
        if int(attack_steps) < 0 or float(beta) < 0 or float(w_lr) <= 0:
            raise UserError(f"method.attack_steps={attack_steps}, beta={beta}, w_lr={w_lr}: attack_steps and beta "
                            f"must be >= 0, w_lr > 0")
        self.path, self.beta, self.attack_steps = path, float(beta), int(attack_steps)
        self.w_lr, self.w_weight_decay, self.sparse_weight = float(w_lr), float(w_weight_decay), float(sparse_weight)
        self.sets = self.sizes = self.continuation = torch.empty(0)
        self.special_ids = torch.empty(0, dtype=torch.long)
        self.p: torch.Tensor | None = None  # the last step's weights (tests)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if bool(ctx.task.is_regression):
            raise UserError(f"method={self.name} attacks a classifier; task={ctx.task.name} is a regression task")
        self.sets, self.sizes, self.continuation = wordpiece_sets(ctx, self.path, self.name)
        self.special_ids = torch.tensor(sorted(set(ctx.tokenizer.all_special_ids)), dtype=torch.long)
        return super().setup(model, ctx)

    def flops_factor(self) -> float:
        """The attack's target forward (1/3), K forward + input-gradient passes (2K/3), then the clean and the
        adversarial forward + backward (2)."""
        return 2.0 + (1 + 2 * self.attack_steps) / 3

    def synonyms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, S) substitute ids (slot 0 = the token itself) and which are valid."""
        return neighbour_slots(batch, self.sets, self.sizes, self.continuation, self.special_ids)

    def attack(self, model: nn.Module, batch: dict[str, torch.Tensor], syn_embd: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        """The official `get_adv_by_convex_syn` (kl, comb_p) in eval mode: the weights p, detached."""
        was_training = model.training
        model.eval()
        try:
            b, length, s, _ = syn_embd.shape
            w = torch.empty(b, length, s, 1, device=syn_embd.device, dtype=syn_embd.dtype)
            nn.init.kaiming_normal_(w)
            w.requires_grad_()
            optimizer = torch.optim.Adam([w], lr=self.w_lr, weight_decay=self.w_weight_decay)
            with torch.no_grad():
                target = F.softmax(embeds_forward(model, batch, syn_embd[..., 0, :]).float(), dim=1)
            for _ in range(self.attack_steps):
                optimizer.zero_grad()
                p, ww = comb_p(w, valid)
                logits = embeds_forward(model, batch, (p * syn_embd).sum(-2)).float()
                loss = -F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")
                if self.sparse_weight:
                    loss = loss + self.sparse_weight * (-p * F.log_softmax(ww, -2)).sum(-2).mean()
                (w.grad,) = torch.autograd.grad(loss, w)
                optimizer.step()
            return comb_p(w, valid)[0].detach()
        finally:
            model.train(was_training)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        syn, valid = self.synonyms(batch)
        table = model.get_input_embeddings()
        with torch.no_grad():
            syn_embd = table(syn)
        self.p = self.attack(model, batch, syn_embd, valid)
        logits = self.forward(model, batch)
        adv = embeds_forward(model, batch, (self.p * table(syn)).sum(-2))
        kl = F.kl_div(F.log_softmax(adv.float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean")
        loss = task_loss(logits, batch["labels"], False) + self.beta * kl
        return StepOutput(loss, logits.detach())
