"""Child-Tuning (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"; official code
alibaba/AliceMind ChildTuning/): update only a "child network" of the model by masking gradients.

Every optimizer step, after gradient clipping, the gradient g of every eligible tensor is masked entry by
entry before the wrapped method's optimizer step (official: `ChildTuningAdamW.step` masks p.grad in place
first, so Adam's moments see the masked gradient and masked entries still move by momentum and decay):

- F (task-free): g <- g * M / p with a fresh M ~ Bernoulli(p) per entry every step (p = reserve_p).
- D (task-driven): g <- g * M with one fixed mask (no 1/p rescaling, as the official D mode). M keeps the
  top p fraction of the Fisher information estimated once, before training, over the training set:
      F_w = 1/N sum_{b=1..N} clip(d L_b / d w)^2,   M_w = [F_w >= percentile(F, 100 (1 - p))]
  with L_b the task loss of batch b (train mode: dropout on), each tensor's batch gradient clipped to norm
  `trainer.max_grad_norm` on its own, N the number of batches of one pass, and one threshold over all
  eligible entries together (official `ChildTuningDtrainer.calculate_fisher` in ChildTuningD.py). The pass
  is a `ModelStage` ("fisher"); the mask is method state, so a resumed run does not recompute it, and its
  compute is added to cost/total_flops (6 x non-embedding params x tokens, the loop's convention) and
  its time to cost/total_wall_s.

Departures from the official code (commented where they happen):
- eligible tensors: names containing "layer" (the encoder layers, biases and LayerNorms included) for both
  variants; official D uses that rule, official F masks every tensor with a gradient (embeddings, pooler,
  classifier): `selector.eligible.contains=[]` reproduces it.
- F draws M as uniform < p in one flat buffer (the same distribution as torch.bernoulli, not the same
  draws: CPU `bernoulli_` is about 4x slower than `uniform_`), from the global torch RNG (resume-exact).
- the Fisher pass batches the training set as the loop's first epoch does (trainer.batch_size,
  trainer.group_by_length; official: its own shuffled DataLoader of the per-device batch size); its loss is
  the task loss (CE, MSE for regression) of the model's own forward, as the official `outputs["loss"]`,
  not the wrapped method's loss; gradients via torch.autograd.grad w.r.t. the eligible tensors only (the
  same values; no other gradient is computed); run under the run's autocast.
- the threshold is the sorted Fisher value at position ceil(q (n - 1)), q = 1 - p: the entries kept by the
  official `>= np.percentile(F, 100 q)` (linear interpolation lies in (v[k-1], v[k]]), exactly, without
  numpy or a host copy (torch.kthvalue on the device).
- data parallel (robustft/distributed.py): D's pass splits the same batches between the ranks (contiguous
  shares of the batch list, each batch's gradient whole on one rank), then sums the ranks' Fisher sums
  and token counts (one all-reduce per tensor, once per run): the single-process Fisher up to the order
  of the float additions, the same mask on every rank. F draws each step's mask from a generator seeded
  by (seed, optimizer step) on every rank, so all ranks apply one mask with no communication (the global
  RNG streams differ between ranks: dropout draws follow the shard sizes); a single process keeps the
  global torch RNG, unchanged, so its draws differ from a data-parallel run's (same distribution).
- AdamW arithmetic is the wrapped method's optimizer (torch.optim.AdamW: decoupled decay before the
  update, eps after the bias correction); the official ChildTuningAdamW (HF's old AdamW) decays after the
  update and adds eps before the bias correction.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustft import distributed
from robustft.data import collate, epoch_batches
from robustft.errors import UserError
from robustft.methods.base import LoopHandle, Method, TrainContext, model_inputs, task_loss
from robustft.methods.rose import is_eligible
from robustft.methods.selector import Selector, wrapped_name
from robustft.methods.stats import LogWindow
from robustft.models import count_params
from robustft.runtime import autocast, to_device
from robustft.stages import ModelStage, RunStage

log = logging.getLogger("robustft")

VARIANTS = ("d", "f")
ELIGIBLE_KEYS = ("contains", "excludes")


def clip_each_(grads: list[torch.Tensor], max_norm: float) -> None:
    """Clip every tensor's gradient to norm `max_norm` on its own (official: clip_grad_norm_(p) per tensor)."""
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule, per tensor
    torch._foreach_mul_(grads, list(coefs.unbind()))


def fisher_information(model: nn.Module, params: list[nn.Parameter], batches: Iterable[dict[str, torch.Tensor]],
                       n_batches: int, is_regression: bool, max_norm: float, amp: torch.dtype | None
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(F_w per tensor, tokens seen): the mean over batches of the squared, per-tensor clipped gradient."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = params[0].device
    tokens = torch.zeros((), dtype=torch.long, device=device)
    model.train()  # official: dropout on during the pass
    for batch in batches:
        with autocast(device, amp):
            logits = model(**model_inputs(batch)).logits
        loss = task_loss(logits, batch["labels"], is_regression)
        grads = list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))
        clip_each_(grads, max_norm)
        torch._foreach_addcmul_(fisher, grads, grads, value=1.0 / n_batches)
        tokens += batch["attention_mask"].sum()
    return fisher, tokens


def top_fraction_mask(scores: list[torch.Tensor], reserve_p: float) -> list[torch.Tensor]:
    """Boolean masks keeping the entries >= the global (1 - reserve_p) percentile of all `scores`.

    Official: `polar = np.percentile(all, 100 (1 - p))` (linear interpolation), keep `score >= polar`.
    The interpolated value lies in (v[k-1], v[k]] for k = ceil(q (n - 1)) (v sorted, 0-based), so the kept
    set is exactly `score >= v[k]` (and `v[k]` itself when q (n - 1) is a whole number).
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    position = (1.0 - reserve_p) * (flat.numel() - 1)
    k = math.ceil(round(position, 6))  # 0.7 * 10 must be 7, not 7.000000000000001
    threshold = torch.kthvalue(flat, k + 1).values  # kthvalue is 1-based
    return [s >= threshold for s in scores]


def eligible_rule(eligible: Any) -> tuple[list[str], list[str]]:
    """`selector.eligible` as (contains, excludes); unknown keys are errors."""
    rule = OmegaConf.to_container(eligible) if isinstance(eligible, DictConfig) else dict(eligible or {})
    unknown = sorted(set(rule) - set(ELIGIBLE_KEYS))
    missing = [k for k in ELIGIBLE_KEYS if k not in rule]
    if unknown or missing:
        raise UserError(f"selector.eligible needs exactly the keys contains, excludes (unknown {unknown}, "
                        f"missing {missing}); defaults: robustft/conf/selector/child_tuning.yaml")
    return [str(s) for s in rule["contains"] or []], [str(s) for s in rule["excludes"] or []]


class ChildTuning(Selector):
    """Child-Tuning's gradient mask around the wrapped method (see the module docstring)."""

    def __init__(self, name: str, variant: str, reserve_p: float, eligible: Any, inner: Method) -> None:
        if variant not in VARIANTS:
            raise UserError(f"child_tuning variant={variant!r}: choose d (Fisher mask) or f (random mask)")
        if not 0.0 < float(reserve_p) <= 1.0:
            raise UserError(f"child_tuning reserve_p={reserve_p} must be in (0, 1] (the kept fraction; official 0.3)")
        super().__init__(wrapped_name(name, inner))
        self.inner = inner
        self.variant, self.reserve_p = variant, float(reserve_p)
        self.contains, self.excludes = eligible_rule(eligible)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.mask: list[torch.Tensor] | None = None  # D: the child network (bool per entry), set by the Fisher pass
        self.fisher: dict[str, float] = {}  # D: cost of the Fisher pass (tokens, flops, wall_s, batches)
        self._buffer: torch.Tensor | None = None  # F: one flat buffer for the step's random masks
        self._views: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None  # F under data parallelism: the ranks' common stream
        self.density: torch.Tensor | None = None  # fraction of eligible entries masked in (D: fixed)
        self.window = LogWindow(1)

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.window = LogWindow(int(ctx.trainer.log_every))
        return super().setup(model, ctx)

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        """The wrapped method's optimizer, unchanged; the eligible tensors are those it updates."""
        optimizer = super().configure_optimizer(model, trainer)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        chosen = [(n, p) for n, p in model.named_parameters()
                  if id(p) in in_opt and is_eligible(n, self.contains, self.excludes)]
        if not chosen:
            raise UserError(f"child_tuning: no trained tensor's name contains all of {self.contains} "
                            f"(selector.eligible.contains)")
        self.names, self.params = [n for n, _ in chosen], [p for _, p in chosen]
        if self.variant == "f":
            first = self.params[0]
            self._buffer = torch.empty(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
            self._views = [v.view_as(p) for v, p in zip(self._buffer.split([p.numel() for p in self.params]),
                                                        self.params)]
        return optimizer

    def stages(self) -> list[RunStage | ModelStage]:
        """The wrapped method's stages, then (D) the Fisher pass on the model they leave."""
        own = [ModelStage("fisher", self.run_fisher)] if self.variant == "d" else []
        return [*super().stages(), *own]

    # --- D: the Fisher pass -----------------------------------------------------------------------
    def run_fisher(self, model: nn.Module, train: Dataset, loop: LoopHandle) -> None:
        """Estimate the Fisher information over one pass of `train` and keep the top reserve_p (once)."""
        if self.mask is not None:  # restored from checkpoints/last: never recomputed
            log.info("child_tuning: Fisher mask restored from the checkpoint")
            return
        ctx, tcfg = self.ctx, self.ctx.trainer
        t0 = time.perf_counter()
        rows = epoch_batches(train, int(tcfg.batch_size), ctx.seed, 0, bool(tcfg.group_by_length))
        start, stop = distributed.shard_bounds(len(rows))  # all of them in one process
        batches = (to_device(collate(train, r, ctx.tokenizer, ctx.task.is_regression), ctx.device)
                   for r in rows[start:stop])
        fisher, tokens = fisher_information(model, self.params, batches, len(rows), bool(ctx.task.is_regression),
                                            float(tcfg.max_grad_norm), loop.amp)
        if distributed.world_size() > 1:  # each rank summed its batches' terms: the sum over all of them
            fisher = [distributed.all_reduce_sum(f) for f in fisher]
            tokens = distributed.all_reduce_sum(tokens)
        self.set_mask(top_fraction_mask(fisher, self.reserve_p))
        n_tokens = int(tokens)
        flops = 6.0 * count_params(model, non_embedding=True) * n_tokens  # forward + backward per token
        self.fisher = {"batches": float(len(rows)), "tokens": float(n_tokens), "flops": flops,
                       "wall_s": time.perf_counter() - t0}
        log.info("child_tuning: Fisher mask over %d batches keeps %.4f of %d entries", len(rows),
                 float(self.density), sum(p.numel() for p in self.params))
        loop.log({"step": 0, "epoch": 0, "split": "child_fisher", "mask_density": float(self.density),
                  **self.fisher})
        loop.save()  # the mask is in checkpoints/last from now on

    def set_mask(self, mask: list[torch.Tensor]) -> None:
        if [m.shape for m in mask] != [p.shape for p in self.params]:
            raise ValueError("child_tuning: the mask does not match the eligible tensors")
        self.mask = [m.to(device=p.device, dtype=torch.bool) for m, p in zip(mask, self.params)]
        kept = torch.stack([m.sum() for m in self.mask]).sum()
        self.density = kept.double() / sum(m.numel() for m in self.mask)

    # --- the step ---------------------------------------------------------------------------------
    def step_masks(self) -> list[torch.Tensor]:
        """This step's masks, one per eligible tensor (F: a fresh draw already divided by reserve_p)."""
        if self.variant == "d":
            if self.mask is None:
                raise RuntimeError("child_tuning D has no mask: its Fisher stage must run before training")
            return self.mask
        buf = self._buffer
        buf.uniform_(generator=self.rank_common_generator())  # M = [u < p] ~ Bernoulli(p)
        buf.lt_(self.reserve_p)
        self.density = buf.sum().double() / buf.numel()  # a float32 sum: a float64 one costs more than the draw
        buf.div_(self.reserve_p)  # official: grad *= mask / reserve_p
        return self._views

    def rank_common_generator(self) -> torch.Generator | None:
        """None (the global torch RNG, resume-exact) in one process; under data parallelism a generator
        seeded by (seed, optimizer step), the same on every rank and after a resume (the window counts the
        steps done, resumed ones too)."""
        if distributed.world_size() == 1:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=self._buffer.device)
        seed = np.random.SeedSequence([int(self.ctx.seed), self.window.step]).generate_state(1, np.uint64)[0]
        return self._generator.manual_seed(int(seed) >> 1)  # manual_seed takes a signed 64-bit value

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        masks = self.step_masks()
        pairs = [(p.grad, m) for p, m in zip(self.params, masks) if p.grad is not None]
        if pairs:  # one foreach kernel, no host sync (after the loop's clipping, as the official step)
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])
        self.window.add(torch.stack([torch.ones_like(self.density), self.density]))
        logs = super().optimizer_step(optimizer, model)
        return {**logs, **self.step_logs()}

    def step_logs(self) -> dict[str, float]:
        """child/mask_density: fraction of eligible gradient entries kept, averaged since the last train row."""
        sums = self.window.flush()
        return {} if sums is None else {"child/mask_density": sums[1] / sums[0]}

    # --- reporting ----------------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """D: the Fisher pass's cost, added to the run's total (on top of the wrapped method's own)."""
        out = dict(super().metrics(train_metrics))
        if self.variant != "d" or not self.fisher:
            return out
        total_flops = out.get("cost/total_flops", train_metrics["cost/train_flops"])
        total_wall = out.get("cost/total_wall_s", train_metrics["train/wall_s"])
        out.update({"child/fisher_flops": self.fisher["flops"], "child/fisher_wall_s": self.fisher["wall_s"],
                    "child/fisher_tokens": self.fisher["tokens"], "child/mask_density": float(self.density),
                    "cost/total_flops": total_flops + self.fisher["flops"],
                    "cost/total_wall_s": total_wall + self.fisher["wall_s"]})
        return out

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "window": self.window.state_dict(), "fisher": dict(self.fisher)}
        if self.mask is not None:
            state["mask"] = dict(zip(self.names, self.mask))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "window" in state:
            self.window.load_state_dict(state["window"], self.ctx.device if self.ctx else None)
        self.fisher = {k: float(v) for k, v in (state.get("fisher") or {}).items()}
        if state.get("mask") is not None:
            saved = state["mask"]
            if sorted(saved) != sorted(self.names):
                raise UserError("child_tuning: the checkpoint's Fisher mask covers other tensors than this run's "
                                "(selector.eligible changed?); resume=never starts afresh")
            self.set_mask([saved[n] for n in self.names])
