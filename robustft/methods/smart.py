"""SMART (Jiang et al., ACL 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization"; official code namisan/mt-dnn mt_dnn/perturbation.py
`SmartPerturbation`, its options in train.py `--adv_*`, the adversarial loss in mt_dnn/loss.py `SymKlCriterion`).

    loss = CE(f(e), y) + alpha * l_s(f(e), f(e + delta)) + mu * l_s(f(e), f_ema(e))

Smoothness-inducing adversarial regulariser: delta starts at N(0, noise_var^2) on the word embeddings e
(`noise_var` is a standard deviation, as the official `normal_(0, 1) * epsilon`), then k ascent steps

    g = grad_delta l_s(f(e), f(e + delta)),   delta <- Proj_{||.|| <= epsilon}(delta + step_size * g / ||g||)

with the norm (inf or l2) taken per token, and l_s(p, q) = KL(p || q) + KL(q || p) the symmetric KL: as in
the paper's Algorithm 1 (line 8), g is the gradient of the whole symmetric KL in the adversarial
distribution q = p_adv, with the clean prediction p (parameters theta-bar) a constant. Both terms depend on
q, so both give gradient (an earlier version detached each term's target and followed KL(p || q) only).
The regulariser at the final delta is MT-DNN's `SymKlCriterion(clean, adversarial)`: KL(p_adv || p_clean)
+ KL(p_clean || p_adv), each term's target treated as a constant, batch mean, fp32 (MSE for regression).
Every forward is in training mode (independent dropout masks); the adversarial forward back-propagates
into the word-embedding matrix as well (the official `embed + noise`, embed not detached).

Bregman proximal point (mu > 0, the paper's momentum variant): an exponential moving average of the
parameters, theta_ema <- beta * theta_ema + (1 - beta) * theta after each optimizer step (theta_ema starts
at the initial weights), and the term mu * l_s(f(e), f_ema(e)) with f_ema a forward of the same model with
the EMA weights (no gradient; training mode, as the other forwards). The EMA is part of the resume state.

Departures from the official code (all noted in conf/method/smart.yaml too):
- the official ascent replaces delta by (delta + step_size * g) / (||delta + step_size * g|| + epsilon), i.e.
  it normalises the perturbation to (about) unit norm per token and uses `adv_epsilon` only as a stabiliser;
  here is the paper's update: normalised gradient step, then projection onto the epsilon-ball (so epsilon is
  the perturbation radius, default the paper's 1e-5).
- the official ascent (mt_dnn/perturbation.py `SmartPerturbation.forward`) follows the gradient of
  `stable_kl(adv_logits, logits.detach())` = 2 sum p_adv (logodds(p_adv) - logodds(p_clean)), the log-odds
  detached: a one-sided surrogate whose gradient is that of neither KL term; here the paper's symmetric KL.
- the paper normalises the ascent gradient per example (line 8's ||.||_inf over x-tilde); here per token,
  as MT-DNN's default `--adv_norm_level 0`.
- the paper's Algorithm 1 differentiates the final l_s through both distributions; here, as MT-DNN's
  `SymKlCriterion`, each term's target is a constant (so the adversarial forward trains only through q in
  KL(p || q) and the clean one only through p in KL(q || p)).
- the official perturbs MT-DNN's embedding-layer output and feeds it back as `inputs_embeds` (so HF models
  add position/type embeddings and LayerNorm to it a second time); here the word embeddings, the input of the
  same forward as the clean one.
- the official skips the term for a batch whose ascent gradient is not finite; here that makes the loss
  non-finite and the loop stops with its usual error (a check would need a host sync every step).
- MT-DNN has no proximal term (mu = 0 here by default); its form follows the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from robustft.errors import UserError
from robustft.methods.base import StepOutput, model_inputs, task_loss
from robustft.methods.perturb import (
    PerturbationMethod,
    check_nonnegative,
    check_norm,
    divergence,
    embeds_forward,
    normalize,
    project,
    word_embeddings,
)

TOKEN = (-1,)  # norms per token (the official norm_level 0)


def ascent_update(delta: torch.Tensor, grad: torch.Tensor, step_size: float, epsilon: float, norm_p: str) -> torch.Tensor:
    """delta + step_size * g / ||g||, projected onto ||delta|| <= epsilon, norms per token."""
    return project(delta + step_size * normalize(grad, norm_p, TOKEN), norm_p, epsilon, TOKEN)


class Smart(PerturbationMethod):
    """Cross-entropy plus the adversarial smoothness regulariser (and optionally the proximal term)."""

    log_names = ("smart/adv_kl", "smart/prox")

    def __init__(self, name: str, alpha: float, k: int, step_size: float, noise_var: float, epsilon: float,
                 norm_p: str, mu: float, beta: float) -> None:
        super().__init__(name)
        check_nonnegative(alpha=alpha, step_size=step_size, noise_var=noise_var, epsilon=epsilon, mu=mu)
        if int(k) < 1:
            raise UserError(f"method.k={k}: SMART needs at least one ascent step (k >= 1)")
        if not 0.0 <= float(beta) < 1.0:
            raise UserError(f"method.beta={beta} must be in [0, 1) (the EMA keeps beta of its old value)")
        self.alpha, self.k, self.step_size = float(alpha), int(k), float(step_size)
        self.noise_var, self.epsilon, self.norm_p = float(noise_var), float(epsilon), check_norm("norm_p", norm_p)
        self.mu, self.beta = float(mu), float(beta)
        self.params: list[nn.Parameter] | None = None  # trainable parameters, in named_parameters order
        self.names: list[str] = []
        self.ema: list[torch.Tensor] | None = None  # the proximal point's EMA weights (mu > 0)
        self.delta: torch.Tensor | None = None  # the last adversarial perturbation (inspected by tests)

    # --- the regularisers ---------------------------------------------------------------------
    def adversarial(self, model: nn.Module, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """l_s(clean, adversarial) at delta after k ascent steps."""
        regression = self.ctx.task.is_regression
        embeds = word_embeddings(model, batch)
        delta = torch.randn(embeds.shape, device=embeds.device).mul_(self.noise_var).to(embeds.dtype)
        target, fixed = logits.detach(), embeds.detach()
        for _ in range(self.k):
            delta.requires_grad_()
            adv = embeds_forward(model, batch, fixed + delta)
            # the paper's ascent: the gradient of the full symmetric KL in p_adv (target is already a constant).
            # MT-DNN's code ascends its stable_kl surrogate instead (module docstring).
            (grad,) = torch.autograd.grad(divergence(adv, target, regression), delta)
            delta = ascent_update(delta.detach(), grad, self.step_size, self.epsilon, self.norm_p)
        self.delta = delta.detach()
        adv = embeds_forward(model, batch, embeds + delta)
        return divergence(logits, adv, regression, detach_targets=True)

    def proximal(self, model: nn.Module, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """l_s(f(e), f_ema(e)): the Bregman divergence to the EMA weights (gradient through f only)."""
        if self.ema is None:  # theta_ema starts at the weights before the first update
            self.ema = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            ema = functional_call(model, dict(zip(self.names, self.ema)), args=(), kwargs=model_inputs(batch))
        return divergence(logits, ema.logits, self.ctx.task.is_regression)

    # --- hooks --------------------------------------------------------------------------------
    def flops_factor(self) -> float:
        """Clean pass 1; with alpha > 0: k ascent steps (forward + input-gradient backward, 2/3 each) and the
        adversarial forward + backward (1); with mu > 0: the EMA model's forward (1/3)."""
        adversarial = (2 * self.k / 3 + 1) if self.alpha > 0 else 0.0
        return 1.0 + adversarial + (1 / 3 if self.mu > 0 else 0.0)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.params is None:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.names, self.params = [n for n, _ in named], [p for _, p in named]
        logits = self.forward(model, batch)
        loss = task_loss(logits, batch["labels"], self.ctx.task.is_regression)
        if self.alpha == 0 and self.mu == 0:
            return StepOutput(loss, logits.detach())
        adv = prox = torch.zeros((), device=loss.device)
        if self.alpha > 0:
            adv = self.adversarial(model, batch, logits)
            loss = loss + self.alpha * adv
        if self.mu > 0:
            prox = self.proximal(model, batch, logits)
            loss = loss + self.mu * prox
        self.record(adv, prox)
        return StepOutput(loss, logits.detach())

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        optimizer.step()
        if self.ema is not None:  # theta_ema <- beta theta_ema + (1 - beta) theta, one fused op over all tensors
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - self.beta)
        return self.step_logs()

    def step_logs(self) -> dict[str, float]:
        logs = super().step_logs()
        if self.alpha == 0:
            logs.pop("smart/adv_kl", None)
        if self.mu == 0:
            logs.pop("smart/prox", None)
        return logs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ema is not None:
            state["ema"] = list(self.ema)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("ema") is not None:
            device = self.ctx.device if self.ctx else None
            self.ema = [t.to(device) for t in state["ema"]]
