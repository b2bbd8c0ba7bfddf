"""PGD-K adversarial training on the word embeddings (Madry et al., ICLR 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks"), as the baseline of the FreeLB repository (zhuchen03/FreeLB,
fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py `std_adv_train_step`, run with `--std-adv`; launch
scripts fairseq-RoBERTa/launch/VanillaPGD/). TextDefender (RockyLzy/TextDefender trainer/pgd.py,
trainer/gradient.py) runs the same loop.

    delta_0 as FreeLB (zero on padding; l2: U(-1, 1) * adv_init_mag / sqrt(L_i d))
    delta_t = Proj_{||.|| <= adv_max_norm}(delta_{t-1} + adv_lr * g_t / ||g_t||),  g_t = grad_delta L(f(e + delta_{t-1}), y)
    loss = L(f(e + delta_K), y)          (t = 1..K; only this loss trains the model)

Unlike FreeLB, the K ascent steps only move delta (`torch.autograd.grad` with respect to delta: no weight
gradients), the model is trained on the final adversarial example alone and never on the clean input (the
official `optimizer.backward(loss)` after the loop). Norms per example (tokens x hidden), l2 (the official
fairseq code has only l2; TextDefender also linf: clamp). adv_max_norm = 0: no projection. The K + 1
forwards share their dropout masks (torch's RNG state replayed; the official passes `init_dp=False` after
the first forward, `--no-sync-dp` off); each recomputes e, the final one with the graph that trains the
word-embedding matrix.

Departures: the ascent step divides by max(||g||, 1e-8) (fairseq divides by ||g|| unguarded, 0 / 0 = NaN
on an example whose gradient vanishes; TextDefender clamps at 1e-8 as here). TextDefender redraws dropout at
every forward (a plain HF model); here the FreeLB repository's shared masks. Option names follow this
repository's method=freelb (`--adv-lr`, `--rand-init-mag` -> adv_init_mag, `--max-norm` -> adv_max_norm).
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.checkpoint import set_torch_rng_state, torch_rng_state
from robustft.methods.base import StepOutput, task_loss
from robustft.methods.freelb import EXAMPLE, ascent_update, init_delta, set_ascent_options
from robustft.methods.perturb import (
    PerturbationMethod,
    embeds_forward,
    norm,
    word_embeddings,
)


class PGD(PerturbationMethod):
    """K projected ascent steps on a word-embedding perturbation; the loss at the last one trains the model."""

    log_names = ("pgd/delta_norm", "pgd/adv_loss_gain")

    def __init__(self, name: str, adv_steps: int, adv_lr: float, adv_init_mag: float, adv_max_norm: float,
                 norm_type: str) -> None:
        super().__init__(name)
        set_ascent_options(self, adv_steps, adv_lr, adv_init_mag, adv_max_norm, norm_type,
                           "PGD-K takes K >= 1 ascent steps")
        self.delta: torch.Tensor | None = None  # the final perturbation (logged; inspected by tests)

    def flops_factor(self) -> float:
        """K ascent steps (forward 1/3 + input-gradient backward 1/3 each) and the adversarial forward + backward."""
        return 1.0 + 2 * self.adv_steps / 3

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        regression, labels = self.ctx.task.is_regression, batch["labels"]
        with torch.no_grad():
            embeds = word_embeddings(model, batch)
        delta = init_delta(embeds, batch["attention_mask"], self.adv_init_mag, self.norm_type)
        rng = torch_rng_state(embeds.device)
        first = None
        for t in range(self.adv_steps):
            if t:  # the first forward's dropout masks for every forward of the step
                set_torch_rng_state(rng, embeds.device)
            delta.requires_grad_()
            loss = task_loss(embeds_forward(model, batch, embeds + delta), labels, regression)
            first = loss.detach() if first is None else first
            (grad,) = torch.autograd.grad(loss, delta)
            delta = ascent_update(delta.detach(), grad, self.adv_lr, self.adv_max_norm, self.norm_type)
        set_torch_rng_state(rng, embeds.device)
        logits = embeds_forward(model, batch, word_embeddings(model, batch) + delta)
        loss = task_loss(logits, labels, regression)
        self.delta = delta.detach()
        # how much the K steps raised the loss over delta_0's (device tensors; synced at log time only)
        self.record(norm(self.delta, "l2", EXAMPLE).mean(), loss.detach() - first)
        return StepOutput(loss, logits.detach())
