"""Stage 1 of weight mixup: alpha (and W) learnt bi-level over random folds of the N training examples.

For each of `folds` random splits of the N examples into D_tr (80%) and D_val, from pretrained W and a
fresh alpha ~ N(1, 0.005):
  inner  min_W CE(W, alpha; D_tr)         AdamW lr 2e-5, wd 0.01 (not on biases/LayerNorm), linear, 10% warmup,
                                          gradient clipping 5.0
  outer  min_alpha CE(W*(alpha), alpha; D_val)  AdamW lr 2e-3, wd 0, cosine, 10% warmup, no clipping
one inner step per outer step, `stage1.epochs` (3) epochs of D_tr per fold, with the hypergradient of
`hypergrad` (Betty's DARTS-style finite difference). W means every inner-level parameter (all but a1, a2
and W0: embeddings, LayerNorm, biases and head included), as in the official code. After each fold alpha
(and every other parameter when `average_weights=true`, the official `total_avg`) is added to a running
sum and the model is reset; at the end the parameters are set to the fold averages (a1 and a2 averaged
separately, as the official code averages its Parameters; with average_weights=false W is back at W0 and
the rest at the pretrained state). The lr multipliers are transformers' schedules (`lr_scale`).

Cost per outer step: exactly four forward/backward pairs (inner step; validation loss, whose single
backward gives both d_alpha L_val and v; two finite-difference passes whose backward runs for alpha only).
Memory: W0 (the mixed weights' pretrained copy) is kept for good; stage 1 also holds the inner Adam state
and v, both freed when stage 1 ends. The pretrained values of the non-mixed parameters, which every fold
restarts from, and the fold sums (all parameters when average_weights=true) wait in temporary safetensors
files (`DiskCopy`), not in RAM.

The stage's progress (fold, step, optimizer states, fold sums) travels in the method state of
checkpoints/last, so a resumed run continues exactly, also inside stage 1. Departures from the official
code: see the package docstring and the comments where they happen.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.optimization import (  # the lambdas behind get_{linear,cosine,constant}_schedule*
    _get_constant_lambda,
    _get_cosine_schedule_with_warmup_lr_lambda,
    _get_linear_schedule_with_warmup_lr_lambda,
)

from robustft.data import collate, length_grouped_order
from robustft.errors import UserError
from robustft.methods.base import LoopHandle, TrainContext, adamw, decay_groups, model_inputs, task_loss
from robustft.methods.weight_mixup.disk import DiskCopy
from robustft.methods.weight_mixup.hypergrad import adam_preconditioned, finite_difference, frozen
from robustft.methods.weight_mixup.mixed import MixedLinear, alphas, inner_params, non_mixed_params
from robustft.runtime import autocast, to_device

log = logging.getLogger("robustft")

PRECONDITIONERS = ("adam", "none")
SCHEDULES = ("linear", "cosine", "constant")
_SPLIT_KEY = 7919  # seeds the fold splits and batch orders apart from every other use of the run seed


def lr_scale(schedule: str, step: int, warmup: float, total: int) -> float:
    """The lr multiplier of transformers' schedule `schedule` at `step` (constant: no warmup).

    The schedule lambdas are called with the step itself rather than through a LambdaLR, so a fold resumed
    mid-way needs no scheduler state; `warmup` may be fractional (the outer level's, as in the official code).
    """
    if schedule == "linear":
        return _get_linear_schedule_with_warmup_lr_lambda(step, num_warmup_steps=warmup, num_training_steps=total)
    if schedule == "cosine":
        return _get_cosine_schedule_with_warmup_lr_lambda(step, num_warmup_steps=warmup, num_training_steps=total,
                                                          num_cycles=0.5)
    return _get_constant_lambda(step)


class BiLevelStage:
    """Stage 1 on a wrapped model: `run(model, train, loop)` does what is left of it (all after `__init__`).

    The options are the method's validated `stage1`, `inner`, `outer` and `fd` dicts (kept by reference).
    """

    def __init__(self, model: nn.Module, mixed: dict[str, MixedLinear], ctx: TrainContext, *, folds: int,
                 init_std: float, average_weights: bool, stage1: dict[str, Any], inner: dict[str, Any],
                 outer: dict[str, Any], fd: dict[str, Any]) -> None:
        self.mixed, self.ctx = mixed, ctx
        self.folds, self.init_std, self.average_weights = folds, init_std, average_weights
        self.stage1, self.inner, self.outer, self.fd = stage1, inner, outer, fd
        # progress (method state)
        self.done = False
        self.fold, self.fold_step, self.outer_steps = 0, 0, 0
        self.wall_s, self.tokens = 0.0, 0  # stage-1 cost, reported by the method's metrics
        self.sums: DiskCopy | None = None  # the running fold sums, on disk (created by the first end_fold)
        self.inner_opt: torch.optim.Optimizer | None = None
        self.outer_opt: torch.optim.Optimizer | None = None
        self._inner_list: list[nn.Parameter] = []
        self._pending_opt: dict[str, Any] | None = None
        # the pretrained non-mixed parameters the folds reset to (W resets to W0)
        self._initial = DiskCopy(non_mixed_params(model, mixed)) if folds > 0 else None
        self._amp: torch.dtype | None = None
        self._window: list[list[float]] = []
        self._window_s = 0.0  # seconds spent in the window's outer steps
        self._lengths: list[int] | None = None  # token counts of the training rows (length-grouped batches)

    def alphas(self) -> list[nn.Parameter]:
        return alphas(self.mixed)

    # --- the run --------------------------------------------------------------------------------------
    def run(self, model: nn.Module, train: Dataset, loop: LoopHandle) -> None:
        """What is left of stage 1 (nothing once done, or with folds=0); then the disk buffers and optimizers go."""
        if not self.done and self.folds > 0:
            self._run_folds(model, train, loop)
        self.done = True
        for disk in (self._initial, self.sums):
            if disk is not None:
                disk.close()
        self._initial = self.sums = self.inner_opt = self.outer_opt = None

    def _run_folds(self, model: nn.Module, train: Dataset, loop: LoopHandle) -> None:
        n = len(train)
        if n < 2:
            raise UserError(f"method=weight_mixup needs at least 2 training examples for its folds, got {n}")
        self._amp = loop.amp
        self._lengths = [len(x) for x in train["input_ids"]]
        model.train()
        while self.fold < self.folds:
            tr, val = self.fold_split(n, self.fold)
            total = self.steps_per_fold(len(tr))
            self._enter_fold(model)
            while self.fold_step < total:
                self._timed_step(model, train, loop, tr, val, total)
            self.end_fold(model)
            self.fold, self.fold_step = self.fold + 1, 0
            if self.fold < self.folds:
                loop.save()
        self.average(model)
        self.done = True
        loop.save()

    def _enter_fold(self, model: nn.Module) -> None:
        """A fresh fold, or the optimizers of a fold resumed mid-way (their states from the method state)."""
        if self.fold_step == 0:
            self.start_fold(model, self.fold)
        elif self.inner_opt is None:  # resumed inside a fold
            self.new_optimizers(model)
            self.inner_opt.load_state_dict(self._pending_opt["inner"])
            self.outer_opt.load_state_dict(self._pending_opt["outer"])
        self._pending_opt = None

    def _timed_step(self, model: nn.Module, train: Dataset, loop: LoopHandle, tr: np.ndarray, val: np.ndarray,
                    total: int) -> None:
        """One outer step with its bookkeeping: cost, the logged window, checkpoints/last every save_every."""
        t0 = time.perf_counter()
        b_tr = self._batch(train, self.batch_rows(tr, self.fold_step, self.fold, 0))
        b_val = self._batch(train, self.batch_rows(val, self.fold_step, self.fold, 1))
        stats = self.outer_step(model, b_tr, b_val, self.fold_step, total)
        self.fold_step += 1
        self.outer_steps += 1
        dt = time.perf_counter() - t0
        self.wall_s += dt
        self._window_s += dt
        # four forward/backward pairs: three on the D_tr batch, one on the D_val batch
        self.tokens += 3 * int(b_tr["attention_mask"].sum()) + int(b_val["attention_mask"].sum())
        self._window.append(stats)
        if self.outer_steps % int(self.ctx.trainer.log_every) == 0 or self.fold_step == total:
            self.log_window(loop, total)
        if self.outer_steps % int(self.ctx.trainer.save_every) == 0 and self.fold_step < total:
            loop.save()

    def _batch(self, train: Dataset, rows: list[int]) -> dict[str, torch.Tensor]:
        return to_device(collate(train, rows, self.ctx.tokenizer, self.ctx.task.is_regression), self.ctx.device)

    # --- folds and batches ----------------------------------------------------------------------------
    def fold_split(self, n: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """Uniform random split of the N examples into D_tr (train_fraction, official int(0.8 N)) and D_val."""
        perm = np.random.default_rng([self.ctx.seed, _SPLIT_KEY, fold]).permutation(n)
        n_tr = int(float(self.stage1["train_fraction"]) * n)
        return np.sort(perm[:n_tr]), np.sort(perm[n_tr:])

    def steps_per_fold(self, n_tr: int) -> int:
        # Departure: epoch-aligned, ceil(epochs * ceil(n_tr / bs)); official epochs * (n_tr // bs + 1).
        return math.ceil(float(self.stage1["epochs"]) * math.ceil(n_tr / int(self.stage1["batch_size"])))

    def batch_rows(self, pool: np.ndarray, step: int, fold: int, level: int) -> list[int]:
        """Batch `step` of a level's endless walk through seeded per-epoch permutations of `pool`.

        Departure: with `stage1.group_by_length` (and the lengths known, see `run`) each epoch's
        batches are length-grouped like the runner's loop; the official code draws plain random batches
        (`group_by_length=false`). It changes which examples share a batch, not the objective, and cuts
        padding (`scripts/bench_weight_mixup.py` prints the padded tokens per epoch both ways).
        """
        bs = int(self.stage1["batch_size"])
        epoch, b = divmod(step, math.ceil(len(pool) / bs))
        rng = np.random.default_rng([self.ctx.seed, _SPLIT_KEY, fold, level, epoch])
        if self._lengths is not None and self.stage1["group_by_length"]:
            order = pool[length_grouped_order([self._lengths[i] for i in pool], bs, rng)]
        else:
            order = rng.permutation(pool)
        return order[b * bs : (b + 1) * bs].tolist()

    def start_fold(self, model: nn.Module, fold: int) -> None:
        """Pretrained state (W = W0, other parameters as loaded), fresh alpha, fresh optimizers.

        Departure: alpha is drawn from a generator seeded by (seed, fold), not from the global RNG.
        """
        with torch.no_grad():
            if self._initial is not None:
                self._initial.restore(non_mixed_params(model, self.mixed))
            gen = torch.Generator().manual_seed(int(self.ctx.seed) * 1000 + fold)
            for m in self.mixed.values():
                m.weight.copy_(m.weight0)
                for a in (m.a1, m.a2):  # official: N(1, 0.005) per fold, then clamped to [0, 1]
                    a.copy_(torch.normal(1.0, self.init_std, size=tuple(a.shape), generator=gen, dtype=a.dtype))
                m.clamp_()
        self.new_optimizers(model)

    def new_optimizers(self, model: nn.Module) -> None:
        """Departure: torch AdamW (decay before the update) at both levels; official inner: HF AdamW 4.24."""
        groups = decay_groups(inner_params(model, self.mixed), self.inner["weight_decay"])
        self.inner_opt = adamw(groups, float(self.inner["lr"]), self.ctx.device)  # fused, as the loop's
        self.outer_opt = torch.optim.AdamW(self.alphas(), lr=float(self.outer["lr"]),
                                           weight_decay=float(self.outer["weight_decay"]))
        self._inner_list = [p for g in self.inner_opt.param_groups for p in g["params"]]

    @torch.no_grad()
    def end_fold(self, model: nn.Module) -> None:
        """Add this fold's alpha (and, with average_weights, every parameter) to the running sums."""
        for m in self.mixed.values():
            m.clamp_()
        named = model.named_parameters() if self.average_weights else (
            (n, p) for n, p in model.named_parameters() if n.endswith((".a1", ".a2")))
        self.inner_opt = self.outer_opt = None  # freed first: the sums pass through RAM while they are added
        if self.sums is None:
            self.sums = DiskCopy(named)
        else:
            self.sums.add(named)

    @torch.no_grad()
    def average(self, model: nn.Module) -> None:
        """Parameters := fold averages (official: reset to pretrained after each fold, then load the averages)."""
        if not self.average_weights:
            self._initial.restore(non_mixed_params(model, self.mixed))
            for m in self.mixed.values():
                m.weight.copy_(m.weight0)
        self.sums.restore(model.named_parameters(), divisor=self.folds)
        for m in self.mixed.values():
            m.clamp_()

    # --- progress reports -----------------------------------------------------------------------------
    def log_window(self, loop: LoopHandle, total: int) -> None:
        """A metrics.jsonl row (window means) and a progress line: stage 1 can run for hours before the
        loop's own step lines start."""
        if not self._window:
            return
        keys = ("loss", "val_loss", "hypergrad_norm", "fd_eps")
        means = np.mean(np.asarray(self._window, dtype=np.float64), axis=0)
        row = {"step": self.outer_steps, "epoch": self.fold, "split": "stage1", "fold": self.fold,
               **dict(zip(keys, means.tolist())), **self.alpha_stats(),
               "lr": self.inner_opt.param_groups[0]["lr"], "alpha_lr": self.outer_opt.param_groups[0]["lr"]}
        log.info("stage 1 fold %d/%d step %d/%d loss %.4f val_loss %.4f alpha_mean %.4f %.2f s/outer step",
                 self.fold + 1, self.folds, self.fold_step, total, row["loss"], row["val_loss"], row["alpha_mean"],
                 self._window_s / len(self._window))
        self._window, self._window_s = [], 0.0
        loop.log(row)

    @torch.no_grad()
    def alpha_stats(self) -> dict[str, float]:
        """Mean/min/max of alpha over every mixed weight (exact for a1 a2^T with a1, a2 >= 0)."""
        total = count = 0.0
        lo, hi = math.inf, -math.inf
        for m in self.mixed.values():
            total += float(m.a1.sum() * m.a2.sum())
            count += m.a1.numel() * m.a2.numel()
            lo, hi = min(lo, float(m.a1.min() * m.a2.min())), max(hi, float(m.a1.max() * m.a2.max()))
        return {"alpha_mean": total / count, "alpha_min": lo, "alpha_max": hi}

    # --- one outer step -------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.ctx.device, self._amp):
            logits = model(**model_inputs(batch)).logits
        return task_loss(logits, batch["labels"], self.ctx.task.is_regression)

    def set_lrs(self, step: int, total: int) -> None:
        for opt, cfg in ((self.inner_opt, self.inner), (self.outer_opt, self.outer)):
            # official: inner warmup (S * 0.1) // 1 steps (floor), outer S * 0.1 (a float) as passed to HF
            warmup = float(cfg["warmup_ratio"]) * total
            warmup = math.floor(warmup) if opt is self.inner_opt else warmup
            scale = lr_scale(cfg["schedule"], step, warmup, total)
            for g in opt.param_groups:
                g["lr"] = float(cfg["lr"]) * scale

    def inner_step(self, model: nn.Module, b_tr: dict[str, torch.Tensor]) -> float:
        """One lower-level AdamW step on a D_tr batch (gradients for W only, clipped to max_grad_norm)."""
        with frozen(self.alphas()):
            loss = self.loss(model, b_tr)
            grads = torch.autograd.grad(loss, self._inner_list, allow_unused=True)
        for p, g in zip(self._inner_list, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(self._inner_list, float(self.inner["max_grad_norm"]))
        self.inner_opt.step()
        for p in self._inner_list:
            p.grad = None
        return float(loss.detach())

    def outer_step(self, model: nn.Module, b_tr: dict[str, torch.Tensor], b_val: dict[str, torch.Tensor],
                   step: int, total: int) -> list[float]:
        """inner step, hypergradient, outer AdamW step on alpha, clamp: four forward/backward pairs.

        Departure: one inner and one outer step per iteration (Betty 0.2.0's broken roll-back repeats both).
        """
        self.set_lrs(step, total)
        loss_tr = self.inner_step(model, b_tr)
        hyper, info = self.hypergradient(model, b_tr, b_val)
        for a, g in zip(self.alphas(), hyper):
            a.grad = g
        self.outer_opt.step()  # official outer config: no gradient clipping
        for m in self.mixed.values():
            m.a1.grad = m.a2.grad = None
            m.clamp_()  # official: clamped before every use; nothing reads alpha in between
        return [loss_tr, info["val_loss"], info["hypergrad_norm"], info["fd_eps"]]

    def precondition(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """v as `fd.precondition` says: scaled by the inner Adam state (`adam`) or as it is (`none`)."""
        return v if self.fd["precondition"] == "none" else adam_preconditioned(v, self._inner_list, self.inner_opt)

    def hypergradient(self, model: nn.Module, b_tr: dict[str, torch.Tensor], b_val: dict[str, torch.Tensor]
                      ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """d_alpha L_val - [d_alpha L_tr(W + eps v) - d_alpha L_tr(W - eps v)] / (2 eps), W untouched."""
        alphas, inner = self.alphas(), self._inner_list
        loss_val = self.loss(model, b_val)
        grads = torch.autograd.grad(loss_val, alphas + inner, allow_unused=True)  # one backward: both parts
        direct = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads[: len(alphas)], alphas)]
        v = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[len(alphas):], inner)]
        del grads
        v = self.precondition(v)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in v])))
        eps = float(self.fd["radius"]) / (norm + 1e-12)  # Betty 0.2.0: R / (||v|| + 1e-12)
        implicit = self.finite_difference(model, b_tr, v, eps)
        hyper = [d - i for d, i in zip(direct, implicit)]
        hnorm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(h) for h in hyper])))
        return hyper, {"val_loss": float(loss_val.detach()), "hypergrad_norm": hnorm, "fd_eps": eps}

    def finite_difference(self, model: nn.Module, batch: dict[str, torch.Tensor], v: list[torch.Tensor],
                          eps: float) -> list[torch.Tensor]:
        """[d_alpha L(W + eps v) - d_alpha L(W - eps v)] / (2 eps) on `batch`, W untouched (see `hypergrad`)."""
        by_id = dict(zip((id(p) for p in self._inner_list), v))
        return finite_difference(lambda: self.loss(model, batch), self.mixed, non_mixed_params(model, self.mixed),
                                 by_id, eps, self.ctx.device)

    # --- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage1_done": self.done, "fold": self.fold, "fold_step": self.fold_step,
            "outer_steps": self.outer_steps, "stage1_time": self.wall_s, "stage1_tokens": self.tokens,
        }
        if not self.done:
            state["sums"] = self.sums.load() if self.sums is not None else {}
            if self.fold_step > 0 and self.inner_opt is not None:
                state["optimizers"] = {"inner": self.inner_opt.state_dict(), "outer": self.outer_opt.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state["stage1_done"])
        self.fold, self.fold_step = int(state["fold"]), int(state["fold_step"])
        self.outer_steps = int(state["outer_steps"])
        self.wall_s, self.tokens = float(state["stage1_time"]), int(state["stage1_tokens"])
        sums = state.get("sums") or {}
        self.sums = DiskCopy(sums.items()) if sums else None
        self._pending_opt = state.get("optimizers")
        self.inner_opt = self.outer_opt = None
