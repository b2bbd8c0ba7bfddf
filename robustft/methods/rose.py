"""ROSE: robust selective fine-tuning (Jiang et al., EMNLP 2022; official code jiangllan/ROSE).

At every optimizer step each eligible weight tensor p gets one mask value m_p (per tensor, never per
element) and a masked AdamW (the official `SparseAdamW`) updates it with g' = m g + (1 - m) m_{t-1}:
both moments are updated with g', the parameter update and the weight decay are scaled by m, so a
frozen tensor (m = 0) keeps its first moment and does not move.

- first: two forward passes with dropout; the loss is CE = 0.5 (CE(z1) + CE(z2)); a symmetric KL between
  the two predictive distributions is back-propagated alone (torch.autograd.grad, never part of the
  loss) to score s_p = ||grad_p KL||_2.
- second: s_p = | (1 - beta1) ||g_p|| / ||m_p^{t-1}|| - 1 | from the clipped CE gradient and Adam's first
  moment before the step (all-ones mask on the first step, when there is no moment yet).
- ensemble: m = (1 - gamma) m_second + gamma m_first (values in {0, 0.5, 1} for gamma = 0.5).
- mask: m_p = 1 if quantile(s, lower) <= s_p <= quantile(s, upper) else 0 (torch.quantile, linear).

`Rose` wraps an inner method that defines the loss (vanilla for `method=rose`, any method with
`selector=rose`) and delegates to it: model set-up, data, forward, prediction, the per-step hook
(`inner.optimizer_step` is called with the masked optimizer, so its own logging still runs) and, for
the second-order variant, the whole training step. The first-order variants replace the training step
with two calls of `inner.forward`, so a method whose loss is more than the task loss on its logits keeps
its forward (e.g. Match-Tuning's matching) but not its extra loss terms.

Departures from the official code, all commented where they happen:
- second-order uses 1 - beta1 where the official code hard-codes 0.1 (equal for beta1 = 0.9).
- AdamW arithmetic is torch.optim.AdamW's (decoupled decay applied before the update, eps added after
  the bias correction of the second moment); the official optimizer (HF's old AdamW) decays after the
  update and adds eps before the bias correction. With all-ones masks this optimizer equals
  torch.optim.AdamW bit for bit, so with adam_beta2=null adam_eps=null ROSE's only difference from the
  wrapped method is the selection (defaults: the official beta2 0.98, eps 1e-6).
- the second-order rule is the official formula; note that with lower=0 it keeps the tensors whose
  current gradient is largest relative to their momentum (s = 1 - (1 - beta1) r falls as r rises).
- with gradient accumulation the first-order scores are summed over the micro-batches of a step (the
  official trainer supports one micro-batch per step: its KL zero_grad would erase accumulated CE grads).
- an all-zero first moment (a tensor that never had a gradient) is clamped to avoid 0/0 in the
  second-order score.
- the first-order passes use the model's own dropout; the official run sets attention and hidden
  dropout to `--kl_dropout` (default 0.1, the same as minilm/BERT/RoBERTa's own) for the whole run.
- the KL gradient is taken with torch.autograd.grad w.r.t. the eligible tensors only (the official
  code back-propagates into every .grad, then zeroes them): same scores, no embedding/head gradients.
- data parallel (robustft/distributed.py; every rank scores its shard of the global batch): first-order
  scores are the norms of the KL gradient summed over the ranks (one all-reduce of the eligible tensors'
  KL gradients and the KL per micro-batch), i.e. of the global batch's KL gradient as one process
  computes it, so every rank draws the same mask; the official code under DDP back-propagates the KL
  into .grad, which DDP averages: the same norms / world size, the same quantile mask. Second-order
  scores use the DDP-averaged gradients and the optimizer's moments, identical on every rank already.
  `rose/kl` is then the global batch's KL on every rank.
- not method options (trainer settings of the official runs): RoBERTa only, 10 epochs, no LR warmup,
  fp16, last-epoch model; the runner's trainer config decides these here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.optim.adamw import adamw as adamw_kernel  # torch.optim.AdamW's functional form

from robustft import distributed
from robustft.errors import UserError
from robustft.methods.base import Method, StepOutput, TrainContext, task_loss
from robustft.methods.selector import Selector
from robustft.methods.stats import LogWindow
from robustft.methods.vanilla import Vanilla

VARIANTS = ("first", "second", "ensemble")


def quantile_mask(scores: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """1.0 where quantile(scores, lower%) <= score <= quantile(scores, upper%), else 0.0 (float mask)."""
    q = torch.quantile(scores.float(), torch.tensor([lower / 100.0, upper / 100.0], device=scores.device))
    return ((scores >= q[0]) & (scores <= q[1])).float()


def symmetric_kl(logits1: torch.Tensor, logits2: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """The official ROSE-first divergence: (KL(p2||p1) + KL(p1||p2)) summed over the batch / 4; MSE for regression."""
    if is_regression:
        return F.mse_loss(logits1.float().squeeze(-1), logits2.float().squeeze(-1))
    lp1, lp2 = F.log_softmax(logits1.float(), -1), F.log_softmax(logits2.float(), -1)
    kl = F.kl_div(lp1, lp2, reduction="sum", log_target=True) + F.kl_div(lp2, lp1, reduction="sum", log_target=True)
    return kl / 4.0


def global_kl_grads(grads: list[torch.Tensor], kl: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The KL's gradients and value summed over the ranks (the KL is a sum over examples, so these are the
    global batch's), in one all-reduce of a flat buffer."""
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [kl.reshape(1).float()])
    total = distributed.all_reduce_sum(flat)
    parts = total.split([g.numel() for g in grads] + [1])
    return [t.view_as(g).to(g.dtype) for t, g in zip(parts, grads)], parts[-1].reshape(()).to(kl.dtype)


def is_eligible(name: str, contains: Sequence[str], excludes: Sequence[str]) -> bool:
    return all(s in name for s in contains) and not any(s in name for s in excludes)


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW with one mask value per eligible tensor (the official SparseAdamW, torch.optim.AdamW arithmetic).

    `set_mask(mask)` before `step()` gives the mask of `eligible[i]` as `mask[i]` (None = all ones);
    ineligible tensors always update. Tensors are bucketed by mask value (at most three buckets:
    1, 0.5, 0). A bucket with m > 0 is updated by torch's own AdamW kernel (`torch.optim.adamw.adamw`,
    with the foreach/fused choice of the optimizer it replaces) on g' = m g + (1 - m) exp_avg with the
    learning rate scaled by m, which scales both the Adam update and the decoupled weight decay by m
    (m = 1 is plain AdamW, bit for bit). For m = 0 only the second moment changes (g' = exp_avg leaves
    the first moment as it is, and the parameter does not move). Every tensor with a gradient advances
    its step count (bias correction), masked or not, as in the official optimizer.
    """

    def __init__(self, params, eligible: Sequence[nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "foreach": foreach, "fused": fused}
        super().__init__(params, defaults)
        self.eligible = list(eligible)
        index = {id(p): i for i, p in enumerate(self.eligible)}
        self._mask_index = [[index.get(id(p), -1) for p in g["params"]] for g in self.param_groups]
        if len(index) != sum(i >= 0 for idx in self._mask_index for i in idx):
            raise ValueError("every eligible tensor must be in the optimizer's parameter groups")
        self._mask: list[float] | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """The mask for the next step() only (one host transfer of len(eligible) floats)."""
        if mask is not None and mask.numel() != len(self.eligible):
            raise ValueError(f"mask has {mask.numel()} values for {len(self.eligible)} eligible tensors")
        self._mask = None if mask is None else mask.tolist()

    def exp_avgs(self) -> list[torch.Tensor] | None:
        """The eligible tensors' first moments, or None before the first step."""
        states = [self.state[p] for p in self.eligible]
        return [s["exp_avg"] for s in states] if all(states) else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mask, self._mask = self._mask, None
        for group, index in zip(self.param_groups, self._mask_index):
            buckets: dict[float, list[nn.Parameter]] = {}
            for p, k in zip(group["params"], index):
                if p.grad is not None:
                    buckets.setdefault(1.0 if k < 0 or mask is None else float(mask[k]), []).append(p)
            for m, params in buckets.items():
                self._update(group, params, m)
        return loss

    def _update(self, group: dict, params: list[nn.Parameter], m: float) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:  # as torch.optim.AdamW: float32 step counters, on the device only when fused
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads = [p.grad for p in params]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        steps = [st["step"] for st in states]
        if m == 0.0:  # frozen: g' = exp_avg, so exp_avg is unchanged, exp_avg_sq sees exp_avg^2, p stays
            torch._foreach_add_(steps, 1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, exp_avgs, exp_avgs, value=1 - beta2)
            return
        if m != 1.0:  # g' = m g + (1 - m) exp_avg (official: in place on p.grad too)
            torch._foreach_mul_(grads, m)
            torch._foreach_add_(grads, exp_avgs, alpha=1 - m)
        # lr * m scales both the Adam update and the decoupled weight decay by m
        adamw_kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"], fused=group["fused"],
                     amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"] * m,
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


@dataclass(frozen=True)
class Eligible:
    """The tensors ROSE may freeze: names containing every `contains` and none of the `excludes` substrings."""

    contains: Sequence[str]
    excludes: Sequence[str]


class Rose(Selector):
    """ROSE selection around an inner method: the runner's `inner` (selector=rose), or vanilla (method=rose)."""


    def __init__(self, *, name: str, variant: str, lower: float, upper: float, gamma: float,
                 adam_beta2: float | None, adam_eps: float | None, eligible: Eligible | Mapping[str, Sequence[str]],
                 start_step: int, inner: Method | None = None) -> None:
        if variant not in VARIANTS:
            raise UserError(f"rose variant={variant!r}: choose one of {', '.join(VARIANTS)}")
        if not 0.0 <= float(lower) <= float(upper) <= 100.0:
            raise UserError(f"rose lower={lower}, upper={upper}: need 0 <= lower <= upper <= 100 (percent)")
        if not 0.0 <= float(gamma) <= 1.0:
            raise UserError(f"rose gamma={gamma} must be in [0, 1]")
        if isinstance(inner, Rose):
            raise UserError("ROSE is already the method (method=rose); use selector=none, or another method with selector=rose")
        super().__init__(name if inner is None else f"{inner.name}+{name}")
        self.inner = inner if inner is not None else Vanilla(name="vanilla")
        self.variant, self.lower, self.upper, self.gamma = variant, float(lower), float(upper), float(gamma)
        self.adam_beta2 = None if adam_beta2 is None else float(adam_beta2)
        self.adam_eps = None if adam_eps is None else float(adam_eps)
        rule = eligible if isinstance(eligible, Eligible) else Eligible(**eligible)
        self.contains, self.excludes = list(rule.contains), list(rule.excludes)
        self.start_step = int(start_step)
        self.eligible: list[nn.Parameter] = []
        self.eligible_names: list[str] = []
        self._kl_scores: torch.Tensor | None = None  # first-order scores accumulated over the step's micro-batches
        self._kl_sum: torch.Tensor | None = None
        self.window = LogWindow(1)

    # --- set-up (every other hook not defined here is the inner method's: Selector) -------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.window = LogWindow(int(ctx.trainer.log_every))
        return super().setup(model, ctx)

    # --- optimizer ----------------------------------------------------------------------------
    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> MaskedAdamW:
        """The inner method's AdamW parameter groups (lr, decay) in a MaskedAdamW (beta2, eps: ROSE's options)."""
        base = self.inner.configure_optimizer(model, trainer)
        if type(base) is not torch.optim.AdamW:
            raise UserError(f"ROSE masks AdamW updates; method {self.inner.name} uses {type(base).__name__}")
        in_opt = {id(p) for g in base.param_groups for p in g["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in in_opt]
        chosen = [(n, p) for n, p in named if is_eligible(n, self.contains, self.excludes)]
        if not chosen:
            raise UserError(f"ROSE: no trainable tensor's name contains all of {self.contains} (method.eligible)")
        self.eligible_names = [n for n, _ in chosen]
        self.eligible = [p for _, p in chosen]
        groups = []
        for g in base.param_groups:
            betas = g["betas"] if self.adam_beta2 is None else (g["betas"][0], self.adam_beta2)
            eps = g["eps"] if self.adam_eps is None else self.adam_eps
            groups.append({"params": g["params"], "lr": g["lr"], "betas": betas, "eps": eps,
                           "weight_decay": g["weight_decay"]})
        opts = base.defaults  # the same kernel choice (foreach / fused) as the optimizer it replaces
        return MaskedAdamW(groups, self.eligible, foreach=opts.get("foreach"), fused=opts.get("fused"))

    # --- training step ------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.variant == "second":
            return self.inner.training_step(model, batch)
        regression = self.ctx.task.is_regression
        logits1 = self.inner.forward(model, batch)  # dropout active: two different sub-networks
        logits2 = self.inner.forward(model, batch)
        ce = 0.5 * (task_loss(logits1, batch["labels"], regression) + task_loss(logits2, batch["labels"], regression))
        kl = symmetric_kl(logits1, logits2, regression)
        # The KL only scores tensors: its gradient w.r.t. the eligible tensors (no embedding or head grads
        # are computed), graph kept for the CE backward the loop runs next. It never reaches p.grad.
        grads = torch.autograd.grad(kl, self.eligible, retain_graph=True, materialize_grads=True)
        kl = kl.detach()
        if distributed.world_size() > 1:
            grads, kl = global_kl_grads(list(grads), kl)
        scores = torch.stack(torch._foreach_norm(grads))
        self._kl_scores = scores if self._kl_scores is None else self._kl_scores + scores
        self._kl_sum = kl if self._kl_sum is None else self._kl_sum + kl
        return StepOutput(ce, logits1.detach())

    def flops_factor(self) -> float:
        """First/ensemble: two forwards (2/3), the KL's gradient through both graphs (4/3) and the CE's
        backward through both (4/3): 10/3. Second: the wrapped method's step unchanged."""
        return self.inner.flops_factor() if self.variant == "second" else 10 / 3

    def masks(self, optimizer: MaskedAdamW) -> dict[str, torch.Tensor | None]:
        """This step's first-order, second-order and final masks (None = all ones)."""
        first = second = None
        if self.variant in ("first", "ensemble") and self._kl_scores is not None:
            first = quantile_mask(self._kl_scores, self.lower, self.upper)
        if self.variant in ("second", "ensemble"):
            exp_avgs = optimizer.exp_avgs()
            if exp_avgs is not None:  # none before the first step: all ones (official)
                beta1 = optimizer.param_groups[0]["betas"][0]
                g = torch.stack(torch._foreach_norm([p.grad if p.grad is not None else torch.zeros_like(p)
                                                     for p in self.eligible]))
                h = torch.stack(torch._foreach_norm(exp_avgs)).clamp_min(torch.finfo(torch.float32).tiny)
                # official: |0.1 * ||g|| / ||exp_avg|| - 1|, i.e. 1 - beta1 for its beta1 = 0.9
                second = quantile_mask(((1 - beta1) * g / h - 1).abs(), self.lower, self.upper)
        if self.variant == "first":
            final = first
        elif self.variant == "second":
            final = second
        else:
            ones = torch.ones(len(self.eligible), device=self.eligible[0].device)
            final = (1 - self.gamma) * (ones if second is None else second) + self.gamma * (ones if first is None else first)
        return {"first": first, "second": second, "final": final}

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        if not isinstance(optimizer, MaskedAdamW):
            raise TypeError("Rose.optimizer_step needs the MaskedAdamW from Rose.configure_optimizer")
        step = self.window.step + 1  # this optimizer step, 1-based (the window counts steps, resumed too)
        mask = self.masks(optimizer)["final"] if step > self.start_step else None
        optimizer.set_mask(mask)
        logs = self.inner.optimizer_step(optimizer, model)  # calls optimizer.step() with the mask
        device = self.eligible[0].device
        if mask is None:
            mask = torch.ones(len(self.eligible), device=device)
        kl = self._kl_sum if self._kl_sum is not None else torch.zeros((), device=device)
        one = torch.ones((), device=device)
        self.window.add(torch.stack([one, (mask > 0).float().mean(), mask.float().mean(), kl.to(device)]))
        self._kl_scores = self._kl_sum = None
        return {**logs, **self.step_logs()}

    def step_logs(self) -> dict[str, float]:
        """Mask statistics, averaged over the optimizer steps since the last train row.

        rose/updated_frac: fraction of eligible tensors with a non-zero mask; rose/mask_mean: mean mask
        value (differs from updated_frac only for the ensemble's 0.5 values); rose/kl (first, ensemble):
        the symmetric KL between the two dropout passes, summed over a step's micro-batches.
        """
        sums = self.window.flush()
        if sums is None:
            return {}
        n, updated, mean, kl = sums
        logs = {"rose/updated_frac": updated / n, "rose/mask_mean": mean / n}
        if self.variant != "second":
            logs["rose/kl"] = kl / n
        return logs

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "window" in state:
            self.window.load_state_dict(state["window"], self.ctx.device if self.ctx else None)
