"""RecAdam (Chen et al., EMNLP 2020, "Recall and Learn"; official code Sanyuan-Chen/RecAdam): AdamW with an
annealed quadratic pull toward the pretrained weights theta*.

The objective is lambda(t) * Loss_task + (1 - lambda(t)) * (gamma / 2) * ||theta - theta*||^2, and the
official optimizer applies it per step t (1-based) to every tensor of the pretrained backbone as

    theta <- theta - lr * lambda(t) * AdamStep(grad)                  (Adam moments of the task gradient only)
    theta <- theta - lr * (w - lambda(t)) * gamma * (theta - theta*)   (the quadratic penalty's gradient step)
    theta <- theta - lr * weight_decay * theta                         (decoupled weight decay)

with lambda(t) = w / (1 + exp(-k (t - t0))) (`anneal_fun=sigmoid`; also `linear`: w min(1, t / t0),
`constant`: w), gamma = `pretrain_cof`, w = `anneal_w`. The newly initialised head (every tensor outside
`model.base_model_prefix`, the official "model_type not in name" rule) gets plain AdamW (the official
anneal_w = 0 groups). lambda starts near 0: early steps mostly pull toward theta*, and once lambda(t)
rounds to w = 1 (for the defaults, about 75 steps after t0) the update is AdamW exactly.

`RecAdamW` runs torch's own AdamW kernel (`torch.optim.adamw.adamw`, the foreach/fused choice of the AdamW
it replaces) with the learning rate scaled by lambda(t) and adds the decay and the pull with
`torch._foreach_*` ops; when lambda(t) = 1 and the pull is 0 (the head, and the backbone once annealed, or
`anneal_fun=constant anneal_w=1`) it is the AdamW kernel call itself, so the run equals torch.optim.AdamW
bit for bit. The pretrained copy theta* and the step count t live in the optimizer state (checkpoints/last
carries them: a resume is exact).

Departures from the official code (commented where they happen):
- AdamW arithmetic is torch.optim.AdamW's (eps added after the bias correction of the second moment, and
  decoupled decay applied before the update); the official optimizer is HF's old AdamW (eps before the
  bias correction, decay after the update and after the pull).
- The pull factor lr * (w - lambda) * gamma is capped at 1 (the step moves at most to theta*, never past
  it). The official update overshoots theta* and diverges when lr * gamma > 1 (e.g. lr 1e-3 with
  gamma 5000); at the official lr 2e-5 the factor is at most 0.1 and the cap never acts.
- Note (official, kept): `pretrain_cof=0` alone is not AdamW: the task step is still scaled by lambda(t).
- Trainer settings of the official runs (lr 2e-5, weight decay 0, eps 1e-8, BERT steps) are not method
  options: the trainer config decides them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.adamw import adamw as adamw_kernel  # torch.optim.AdamW's functional form

from robustft.errors import UserError
from robustft.methods.base import Method, adamw, decay_groups

ANNEAL_FUNS = ("sigmoid", "linear", "constant")


def anneal_lambda(fun: str, step: int, k: float, t0: float, w: float) -> float:
    """lambda(t) of the official `anneal_function` (a Python float: no device sync)."""
    if fun == "sigmoid":
        x = -k * (step - t0)
        return (0.0 if x > 700 else 1.0 / (1.0 + math.exp(x))) * w  # official np.exp: inf -> 0 as well
    if fun == "linear":
        return min(1.0, step / t0) * w
    return w


class RecAdamW(torch.optim.Optimizer):
    """AdamW plus the annealed pull toward the pretrained weights, for groups with `anneal_w` > 0.

    Group keys: the AdamW ones, `anneal_w` (0 = plain AdamW, the head), and the step count `recadam_step`.
    State per anchored tensor: `pretrained` (theta*), plus AdamW's `step`, `exp_avg`, `exp_avg_sq`.
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 anneal_fun: str, anneal_k: float, anneal_t0: float, anneal_w: float, pretrain_cof: float,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "foreach": foreach,
                    "fused": fused, "anneal_fun": anneal_fun, "anneal_k": anneal_k, "anneal_t0": anneal_t0,
                    "anneal_w": anneal_w, "pretrain_cof": pretrain_cof, "recadam_step": 0}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["anneal_w"] > 0:
                for p in group["params"]:
                    self.state[p]["pretrained"] = p.detach().clone()

    def coefficients(self, group: dict, step: int | None = None) -> tuple[float, float]:
        """(lambda(t), pull factor lr (w - lambda) gamma) of `group` at step t (default: its current step)."""
        w = group["anneal_w"]
        if w <= 0:  # official: groups with anneal_w = 0 take the plain Adam step
            return 1.0, 0.0
        t = group["recadam_step"] if step is None else step
        lam = anneal_lambda(group["anneal_fun"], t, group["anneal_k"], group["anneal_t0"], w)
        # capped at 1: never step past theta* (the official factor overshoots and diverges above 1)
        return lam, min(1.0, group["lr"] * (w - lam) * group["pretrain_cof"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                group["recadam_step"] += 1
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[nn.Parameter]) -> None:
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "exp_avg" not in st:  # as torch.optim.AdamW: float32 step counters, on the device only when fused
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lam, pull = self.coefficients(group)
        lr, wd = group["lr"], group["weight_decay"]
        if lam == 1.0 and pull == 0.0:  # plain AdamW: the kernel call torch.optim.AdamW makes
            self._adamw(group, params, states, lr, wd)
            return
        if wd != 0:  # decoupled decay with the full lr (official: not scaled by lambda), before the update
            torch._foreach_mul_(params, 1.0 - lr * wd)
        self._adamw(group, params, states, lr * lam, 0.0)
        if pull > 0:  # theta <- theta + pull (theta* - theta)
            torch._foreach_lerp_(params, [st["pretrained"] for st in states], pull)

    @staticmethod
    def _adamw(group: dict, params: list[nn.Parameter], states: list[dict], lr: float, weight_decay: float) -> None:
        beta1, beta2 = group["betas"]
        adamw_kernel(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                     [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=group["foreach"],
                     fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                     weight_decay=weight_decay, eps=group["eps"], maximize=False)

    def anchored(self) -> list[dict]:
        return [g for g in self.param_groups if g["anneal_w"] > 0]

    def current_lambda(self) -> float:
        """lambda(t) of the backbone at its last step (1.0 without anchored groups)."""
        groups = self.anchored()
        return self.coefficients(groups[0])[0] if groups else 1.0

    @torch.no_grad()
    def anchor_distance(self) -> torch.Tensor:
        """sum ||theta - theta*||^2 over the anchored tensors (the official `logging_Euclid_dist`), on device."""
        params = [p for g in self.anchored() for p in g["params"]]
        if not params:
            return torch.zeros(())
        diffs = torch._foreach_sub(params, [self.state[p]["pretrained"] for p in params])
        return torch.stack(torch._foreach_norm(diffs)).float().square().sum()


class RecAdam(Method):
    """Vanilla fine-tuning with the RecAdam optimizer (see the module docstring)."""

    def __init__(self, name: str, anneal_fun: str, anneal_k: float, anneal_t0: float, anneal_w: float,
                 pretrain_cof: float) -> None:
        super().__init__(name)
        if anneal_fun not in ANNEAL_FUNS:
            raise UserError(f"method.anneal_fun={anneal_fun!r}: choose one of {', '.join(ANNEAL_FUNS)}")
        if float(anneal_k) < 0 or float(pretrain_cof) < 0:
            raise UserError(f"method.anneal_k={anneal_k}, method.pretrain_cof={pretrain_cof} must be >= 0")
        if not 0.0 <= float(anneal_w) <= 1.0:
            raise UserError(f"method.anneal_w={anneal_w} must be in [0, 1] (0 = plain AdamW; official 1.0)")
        if anneal_fun == "linear" and float(anneal_t0) <= 0:
            raise UserError(f"method.anneal_t0={anneal_t0} must be > 0 for anneal_fun=linear (lambda = min(1, t / t0))")
        self.anneal = {"anneal_fun": anneal_fun, "anneal_k": float(anneal_k), "anneal_t0": float(anneal_t0),
                       "anneal_w": float(anneal_w), "pretrain_cof": float(pretrain_cof)}
        self.log_every = 1

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> RecAdamW:
        """Four groups as the official script: (backbone | head) x (decay | no decay); the head is not anchored."""
        self.log_every = max(1, int(trainer.log_every))
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        backbone = [(n, p) for n, p in named if prefix != "." and n.startswith(prefix)]
        if not backbone:
            raise UserError(f"method=rec_adam found no pretrained backbone parameters (names starting with {prefix!r}) "
                            f"in {type(model).__name__}; use a transformer model (minilm, bert, roberta, deberta)")
        head = [(n, p) for n, p in named if not (prefix != "." and n.startswith(prefix))]
        groups = [{**g, "anneal_w": w} for part, w in ((backbone, self.anneal["anneal_w"]), (head, 0.0))
                  for g in decay_groups(part, trainer.weight_decay) if g["params"]]
        device = next(model.parameters()).device
        base = adamw([dict(g) for g in groups], float(trainer.lr), device).defaults  # torch's AdamW settings
        return RecAdamW(groups, lr=float(trainer.lr), betas=base["betas"], eps=base["eps"],
                        weight_decay=base["weight_decay"], foreach=base["foreach"], fused=base["fused"], **self.anneal)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
        """recadam/lambda every step (a Python float); recadam/anchor (sum ||theta - theta*||^2, one pass over
        the backbone) only on the steps that write a train row."""
        optimizer.step()
        if not isinstance(optimizer, RecAdamW):
            return {}
        logs: dict[str, Any] = {"recadam/lambda": optimizer.current_lambda()}
        step = max(g["recadam_step"] for g in optimizer.param_groups)
        if step % self.log_every == 0:
            logs["recadam/anchor"] = optimizer.anchor_distance()
        return logs
