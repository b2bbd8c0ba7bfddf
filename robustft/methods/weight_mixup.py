"""Attention-guided weight mixup with bi-level optimisation (Somayajula et al., NAACL 2024, arXiv 2403.12918;
official code Sai-Ashish/Attention_guided_weight_mixup_BLO, run on the Betty library 0.2.0).

Every mixed linear layer computes y = x (alpha * W)^T + b + x (alpha_bar * W0)^T with W0 the frozen
pretrained weight (its bias unused), W the task weight (starts at W0) and a rank-1 attention alpha = a1 a2^T
(a1: out x 1, a2: 1 x in) kept in [0, 1] by clamping a1 and a2. alpha_bar = (1 - a1)(1 - a2)^T as in the
official `blo.py` (`complement=code`, default), or 1 - alpha as the paper writes it (`complement=paper`).
Mixed: Q, K, V, attention output, FFN in and out of every encoder layer, and the pooler (BERT/minilm
`bert.pooler.dense`, DeBERTa-v2 `pooler.dense`); never embeddings, LayerNorm or the classification head
(RoBERTa's `classifier.dense` is part of its newly initialised head, so it is not mixed either). The
`nn.Linear` modules are replaced in place by `MixedLinear`, which reuses their `weight`/`bias` Parameters.
(A DeBERTa-v2 config with share_att_key=false also has per-layer pos_key_proj/pos_query_proj; being
attention projections inside the encoder layers, they are mixed too. deberta-v3 shares them with K/Q.)

Data: `train_size` N subsamples the training set (stratified for classification, seeded exactly like
`stress=low_resource` with n=N, so both pick the same examples); stage 1 and stage 2 both use these N.

Stage 1 (bi-level, in `before_training`, before the runner's loop): for each of `folds` random splits of
the N examples into D_tr (80%) and D_val, from pretrained W and a fresh alpha ~ N(1, 0.005):
  inner  min_W CE(W, alpha; D_tr)         AdamW lr 2e-5, wd 0.01 (not on biases/LayerNorm), linear, 10% warmup,
                                          gradient clipping 5.0
  outer  min_alpha CE(W*(alpha), alpha; D_val)  AdamW lr 2e-3, wd 0, cosine, 10% warmup, no clipping
one inner step per outer step, `stage1.epochs` (3) epochs of D_tr per fold. The hypergradient is Betty's
DARTS-style implicit approximation: with v = P d_W L_val (P the per-tensor Adam preconditioner of Betty 0.2.0's
`darts_preconditioned=True`, or identity) and eps = R / ||v||, R = 0.01,
  g_alpha = d_alpha L_val - [d_alpha L_tr(W + eps v) - d_alpha L_tr(W - eps v)] / (2 eps).
W means every inner-level parameter (all but a1, a2 and W0: embeddings, LayerNorm, biases and head
included), as in the official code. After each fold alpha (and every other parameter when
`average_weights=true`, the official `total_avg`) is added to a running sum and the model is reset; at the
end the parameters are set to the fold averages (a1 and a2 averaged separately, as the official code
averages its Parameters; with average_weights=false W is back at W0 and the rest at the pretrained state).

Stage 2 is the runner's loop: W (all parameters but a1, a2, W0) fine-tuned on the N examples with alpha and
W0 frozen, with the trainer's batch size, epochs, warmup and clipping (official: batch 16, 3 epochs, warmup
10%, wd 0.01, lr 2e-5, clip 1.0 - the settings of its vanilla baseline).

Cost per outer step: exactly four forward/backward pairs (inner step; validation loss, whose single
backward gives both d_alpha L_val and v; two finite-difference passes whose backward runs for alpha only:
W and the other parameters enter them as constants, so no weight gradients are formed). The second
finite-difference pass replays the first one's dropout masks instead of drawing them again (`SameDropout`).
Memory: W0 (the mixed weights' pretrained copy) is kept for good; stage 1 also holds the inner Adam state
and v, both freed when stage 1 ends. The pretrained values of the non-mixed parameters, which every fold
restarts from, and the fold sums (all parameters when average_weights=true) wait in temporary safetensors
files (`DiskCopy`), not in RAM. The finite difference never writes the mixed weights: mixed
layers add eps v inside their forward/backward (`MixedLinear.delta`). The other parameters are perturbed
in place and restored from a copy of the entries v touches (for the word embeddings, only the rows the
D_val batch looked up), so W ends bit-exactly what it was. `MixedLinear` is a custom autograd function
that saves only its input (plus references to W, W0, v) and rebuilds alpha * W + alpha_bar * W0 in
backward, so no weight-sized tensor per layer is kept alive between forward and backward.

Checkpoints: `MixedLinear` saves itself as a plain linear layer (`weight` = alpha * W + alpha_bar * W0, its
bias), so `save_pretrained` folders are ordinary HF models (AutoModelForSequenceClassification loads them).
Loading such a folded weight into a MixedLinear sets W to it and a1 = a2 = 1 (alpha_bar = 0 for both
complements), which computes the same layer exactly; that is how the runner's end-of-training restore of
checkpoints/best works. W, a1, a2 and W0 themselves (and the stage-1 state: fold, step, optimizer states,
fold sums) travel in the method state of checkpoints/last, so a resumed run continues exactly, also
inside stage 1.

Departures from the official code (each also commented where it happens):
- One inner step and one outer step per iteration, W restored exactly after the finite difference. Betty
  0.2.0 (the version the official environment pins) with `roll_back=True` caches states by reference (no
  copy), so its roll-back restores nothing and each iteration runs inner, outer, inner (same batch) and
  outer steps again; its finite difference "restores" W with an out-of-place `add`, leaving W at W - eps v.
  Both were fixed in later Betty (commit 7573af4, "fix bugs in darts and rollback").
- The two finite-difference passes use the same dropout masks (recorded in the first pass and replayed,
  `SameDropout`, or drawn again from the restored RNG state); in the official code they draw independent
  masks, whose difference, divided by 2 eps, swamps the derivative.
- Batches: the inner level walks through D_tr in seeded per-epoch permutations, the outer level through
  D_val likewise; steps per fold = ceil(epochs * ceil(|D_tr| / batch)) (official: epochs * (|D_tr| // batch + 1)).
- The N-example subsample is stratified (official: uniform `random.sample`), and train_size larger than
  the training set is an error (official: silently all of it); the fold splits are uniform
  as in the official code. The official extra "dev" split (N/6 more training examples for monitoring
  stage 1) is not drawn: stage 1 is monitored by its losses in metrics.jsonl (split `stage1`).
- torch.optim.AdamW (decay before the update) for both levels; the official inner optimizer is HF's
  `AdamW` of transformers 4.24 (decay after the update). The official L1 penalty on alpha (off in its
  scripts) is not offered.
- Fresh alpha per fold is drawn from a generator seeded by (seed, fold), not from the global RNG; after
  `setup` (and without stage 1) a1 = a2 = 1, so the wrapped model computes exactly the loaded model.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented hook for op-level modes

from robustft.data import collate, length_grouped_order
from robustft.errors import UserError
from robustft.methods.base import LoopHandle, Method, TrainContext, adamw, model_inputs, no_decay, task_loss

log = logging.getLogger("robustft")

COMPLEMENTS = ("code", "paper")
PRECONDITIONERS = ("adam", "none")
_SPLIT_KEY = 7919  # seeds the fold splits and batch orders apart from every other use of the run seed


@contextmanager
def frozen(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """requires_grad off for `params` inside the block, so autograd forms no gradients for (or through) them;
    each flag is put back as it was."""
    flags = [(p, p.requires_grad) for p in params]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --- the mixed linear layer ---------------------------------------------------------------------------
def mix(weight: torch.Tensor, weight0: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, paper: bool) -> torch.Tensor:
    """alpha * W + alpha_bar * W0 with alpha = a1 a2^T (a rank-1 outer product, by broadcasting); plain autograd ops."""
    alpha = a1 * a2
    if paper:  # the paper: alpha_bar = 1 - alpha
        return alpha * weight + (1 - alpha) * weight0
    return alpha * weight + ((1 - a1) * (1 - a2)) * weight0  # official blo.py: (1 - a1)(1 - a2)^T


_SCRATCH: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def scratch(slot: str, like: torch.Tensor) -> torch.Tensor:
    """A reused buffer shaped like `like` (one per slot, dtype and device; grown to the largest layer).

    The mixed layers rebuild Weff in every forward and backward and use it at once, so one buffer per
    slot serves all layers in turn (ops run in order, also on one CUDA stream). Fresh allocations cost
    more than the mixing itself on CPU (measured: 44 ms vs 30 ms per minilm pass over all mixed layers).
    """
    key = (slot, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = _SCRATCH[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()].view_as(like)


@torch.no_grad()
def mix_fast(weight: torch.Tensor, weight0: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, paper: bool,
             reuse: bool = False) -> torch.Tensor:
    """`mix` without autograd: three passes over the weight (the mixing is memory-bound, so passes are its
    cost); `reuse` writes into scratch buffers (no allocation)."""
    out = scratch("mix", weight) if reuse else torch.empty_like(weight)
    tmp = scratch("tmp", weight) if reuse else torch.empty_like(weight)
    if paper:  # W0 + alpha (W - W0)
        torch.sub(weight, weight0, out=tmp).mul_(a2)
        return torch.addcmul(weight0, tmp, a1, out=out)
    torch.mul(weight, a2, out=out)  # W a2
    torch.mul(weight0, 1 - a2, out=tmp)  # W0 (1 - a2)
    # a1 (W a2) + (1 - a1) W0 (1 - a2): alpha W + (1 - a1)(1 - a2)^T W0 (official blo.py), in one pass.
    # lerp gives exactly W a2 where a1 = 1, so alpha = 1 is still the plain layer bit for bit.
    return torch.lerp(tmp, out, a1, out=out)


def perturbed(weight: torch.Tensor, delta: torch.Tensor | None, eps: float) -> torch.Tensor:
    """W + eps delta (finite-difference passes) in a scratch buffer; W itself otherwise."""
    return weight if delta is None else torch.add(weight, delta, alpha=eps, out=scratch("w", weight))


class _MixedLinearFn(torch.autograd.Function):
    """y = x Weff^T + b, Weff = mix(W + eps delta, W0, a1, a2), saving only x (and references to W, W0, delta).

    Weff is rebuilt in backward, one layer at a time, instead of being kept per layer from forward to
    backward (that would be a second copy of the mixed weights). Gradients are formed only for inputs
    that require them (`needs_input_grad`): the finite-difference passes give W detached, so only d/da1,
    d/da2 and d/dx are computed there.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight0, a1, a2, delta, eps, paper):
        ctx.save_for_backward(x, weight, weight0, a1, a2, delta)
        ctx.eps, ctx.paper = eps, paper
        return F.linear(x, mix_fast(perturbed(weight, delta, eps), weight0, a1, a2, paper, reuse=True), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, weight0, a1, a2, delta = ctx.saved_tensors
        need_x, need_w, need_b, _, need_a1, need_a2 = ctx.needs_input_grad[:6]
        w = perturbed(weight, delta, ctx.eps)
        gx = gw = gb = ga1 = ga2 = None
        if need_x:
            gx = grad_out @ mix_fast(w, weight0, a1, a2, ctx.paper, reuse=True).to(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w or need_a1 or need_a2:
            g = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)  # dL/dWeff, out x in
            if need_a1 or need_a2:
                d = scratch("tmp", g)
                if ctx.paper:  # dL/dalpha = G * (W - W0)
                    torch.sub(w, weight0, out=d).mul_(g)
                    ga1, ga2 = d @ a2.t(), a1.t() @ d
                else:  # dL/dalpha = G * W, dL/dalpha_bar = G * W0, alpha_bar = (1 - a1)(1 - a2)^T
                    torch.mul(g, w, out=d)
                    ga1, ga2 = d @ a2.t(), a1.t() @ d
                    torch.mul(g, weight0, out=d)
                    ga1 -= d @ (1 - a2).t()
                    ga2 -= (1 - a1).t() @ d
            if need_w:
                gw = g.mul_(a2).mul_(a1)  # G * alpha, in place (G is not needed any more)
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb, None, ga1, ga2, None, None, None


class MixedLinear(nn.Module):
    """A linear layer mixing its task weight W with the frozen pretrained W0 through alpha = a1 a2^T.

    Parameters `weight` (W) and `bias` are the wrapped nn.Linear's own Parameters; `a1` (out x 1) and `a2`
    (1 x in) start at 1 (the layer then equals the wrapped one exactly); `weight0` is a non-persistent buffer.
    Its state dict is the folded plain layer (`weight` = Weff, `bias`), see the module docstring.
    `delta`/`eps` (set by the finite difference only) make the layer use W + eps delta without writing W.
    `reference=True` switches to plain autograd ops (double-differentiable; the tests use it).
    """

    def __init__(self, linear: nn.Linear, complement: str = "code") -> None:
        super().__init__()
        if complement not in COMPLEMENTS:
            raise UserError(f"method.complement={complement!r}; use one of {', '.join(COMPLEMENTS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("weight0", linear.weight.detach().clone(), persistent=False)
        like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.a1 = nn.Parameter(torch.ones(self.out_features, 1, **like))
        self.a2 = nn.Parameter(torch.ones(1, self.in_features, **like))
        self.paper = complement == "paper"
        self.reference = False
        self.delta: torch.Tensor | None = None
        self.eps = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.delta is None else self.weight.detach()  # FD passes: no grad for W
        if self.reference:
            w = weight if self.delta is None else torch.add(weight, self.delta, alpha=self.eps)
            return F.linear(x, mix(w, self.weight0, self.a1, self.a2, self.paper), self.bias)
        return _MixedLinearFn.apply(x, weight, self.bias, self.weight0, self.a1, self.a2, self.delta, self.eps,
                                    self.paper)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        return mix_fast(self.weight, self.weight0, self.a1, self.a2, self.paper)  # what forward multiplies by

    @torch.no_grad()
    def clamp_(self) -> None:
        self.a1.clamp_(0, 1)
        self.a2.clamp_(0, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"complement={'paper' if self.paper else 'code'}"

    # A plain nn.Linear on disk: save_pretrained folders load with AutoModelForSequenceClassification.
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.effective_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A folded weight is the whole layer: W = Weff and a1 = a2 = 1 (alpha_bar = 0) compute it exactly.
        # W0 is left alone; the runner's resume then restores W, a1, a2, W0 from the method state.
        for name, param in (("weight", self.weight), ("bias", self.bias)):
            key = prefix + name
            if param is None:
                continue
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != param.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(param.shape)}.")
                continue
            with torch.no_grad():
                param.copy_(value)
                if name == "weight":
                    self.a1.fill_(1.0)
                    self.a2.fill_(1.0)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):] not in ("weight", "bias"):
                    unexpected_keys.append(key)


def mixed_linear_names(model: nn.Module) -> list[str]:
    """Q, K, V, attention output, FFN in/out of every encoder layer, and the pooler's dense layer."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith("classifier"):
            continue
        if re.search(r"(^|\.)encoder\.layer\.\d+\.", name) or re.search(r"(^|\.)pooler\.dense$", name):
            names.append(name)
    return names


def wrap_model(model: nn.Module, complement: str = "code") -> dict[str, MixedLinear]:
    """Replace the mixed nn.Linear modules by MixedLinear in place; returns them by qualified name."""
    names = mixed_linear_names(model)
    if not names:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        raise UserError(f"method=weight_mixup found no encoder-layer linear layers to mix in model_type={mtype!r} "
                        f"({type(model).__name__}); it supports BERT-family (minilm, bert), RoBERTa and DeBERTa-v2")
    mixed = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mixed[name] = MixedLinear(getattr(parent, child), complement)
        setattr(parent, child, mixed[name])
    return mixed


# --- schedules (pure functions of the step, as HF's LambdaLR schedules) -----------------------------
def linear_schedule(step: int, warmup: float, total: int) -> float:
    if step < warmup:
        return step / max(1.0, warmup)
    return max(0.0, (total - step) / max(1.0, total - warmup))


def cosine_schedule(step: int, warmup: float, total: int) -> float:
    if step < warmup:
        return step / max(1.0, warmup)
    progress = (step - warmup) / max(1.0, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule, "constant": lambda step, warmup, total: 1.0}


def _options(value: Any, defaults: dict[str, Any], key: str) -> dict[str, Any]:
    given = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else dict(value or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise UserError(f"method.{key} has unknown option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class SameDropout(TorchDispatchMode):
    """Records the dropout masks one forward pass draws, then replays them in the next pass (`replay=True`).

    The two finite-difference passes run one batch with the same dropout masks. Replaying the first pass's
    masks gives the same tensors as restoring the RNG state and drawing again, bit for bit (tests), without
    the second round of random numbers. Handled are the two ops dropout draws with: `aten.bernoulli_.float`
    (`F.dropout` on CPU, also inside CPU scaled-dot-product attention, and DeBERTa's StableDropout) and
    `aten.native_dropout` (fused, CUDA). The recorded CPU masks are the tensors dropout itself keeps for
    backward (no copies: a replayed mask is sign(recorded), which undoes dropout's in-place 1/(1-p)
    scaling). `replayable` turns False if the pass draws with any other seeded op, or mutates a recorded
    mask other than by a positive scale; the caller then restores the RNG state and draws again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.replay = False
        self.replayable = True
        self._ptrs: set[int] = set()  # storages of the recorded CPU masks
        self._kinds: dict[Any, tuple[str, tuple[str, ...]]] = {}

    def _kind(self, func: Any) -> tuple[str, tuple[str, ...]]:
        """(kind, names of the arguments the op writes), cached per op."""
        if func not in self._kinds:
            aten = torch.ops.aten
            written = tuple(a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write)
            if func is aten.bernoulli_.float:
                kind = "bernoulli"
            elif func is aten.native_dropout.default:
                kind = "native_dropout"
            elif torch.Tag.nondeterministic_seeded in func.tags:
                kind = "seeded"
            elif func in (aten.div_.Scalar, aten.mul_.Scalar):
                kind = "scale"
            else:
                kind = "writes" if written else "other"
            self._kinds[func] = (kind, written)
        return self._kinds[func]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind, written = self._kind(func)
        if kind == "other":
            return func(*args, **kwargs)
        if self.replay and kind == "bernoulli":
            return torch.sign(self.masks.pop(0), out=args[0])
        if self.replay and kind == "native_dropout":
            x, p = args[0], args[1]
            mask = self.masks.pop(0)
            return x * mask * (1.0 / (1.0 - p) if p < 1 else 0.0), mask  # the fused kernel's x * mask * scale
        if not self.replay and kind in ("scale", "writes") and self._ptrs:
            named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
            hit = any(isinstance(named.get(n), torch.Tensor) and named[n].data_ptr() in self._ptrs for n in written)
            if hit and (kind == "writes" or not args[1] > 0):  # zeros of the mask may have moved: not sign()
                self.replayable = False
        out = func(*args, **kwargs)
        if kind == "bernoulli":
            self.masks.append(out)
            self._ptrs.add(out.data_ptr())
        elif kind == "native_dropout":
            self.masks.append(out[1])
        elif kind == "seeded":
            self.replayable = False
        return out


class DiskCopy:
    """Named tensors parked in a temporary safetensors file, read back one at a time.

    Two stage-1 buffers live here instead of in RAM, where they would add to the peak of every outer step:
    the pretrained non-mixed parameters the folds restart from (46 MB for minilm, almost all word
    embeddings; the official code reloads the pretrained model), and the fold sums of
    `average_weights=true` (every parameter, 87 MB). Each costs a read (and, for the sums, a write) per fold.
    """

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="robustft_weight_mixup_")
        self.path = Path(self._dir.name) / "tensors.safetensors"
        self._write({n: t.detach().cpu() for n, t in named})  # written at once: views suffice

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.path.with_suffix(".tmp")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
        os.replace(tmp, self.path)

    @torch.no_grad()
    def restore(self, named: Iterable[tuple[str, torch.Tensor]], divisor: int = 1) -> None:
        """Copy the stored tensor (divided by `divisor`) into each named tensor the file holds."""
        with safe_open(str(self.path), framework="pt") as f:
            keys = set(f.keys())
            for n, t in named:
                if n in keys:
                    x = f.get_tensor(n)
                    t.copy_(x / divisor if divisor != 1 else x)

    @torch.no_grad()
    def add(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stored := stored + named, entry by entry (a name not yet stored starts at its value)."""
        out = load_file(str(self.path))
        for n, t in named:
            x = t.detach().cpu()
            out[n] = out[n].add_(x) if n in out else x
        self._write(out)

    def load(self) -> dict[str, torch.Tensor]:
        """Everything, in RAM (for checkpoints/last)."""
        return load_file(str(self.path))

    def close(self) -> None:
        self._dir.cleanup()


# --- the method -----------------------------------------------------------------------------------------
class WeightMixup(Method):
    STAGE1 = {"epochs": 3, "batch_size": 16, "train_fraction": 0.8, "group_by_length": True}
    INNER = {"lr": 2e-5, "weight_decay": 0.01, "warmup_ratio": 0.1, "schedule": "linear", "max_grad_norm": 5.0}
    OUTER = {"lr": 2e-3, "weight_decay": 0.0, "warmup_ratio": 0.1, "schedule": "cosine"}
    FD = {"radius": 0.01, "precondition": "adam"}
    STAGE2 = {"lr": None, "weight_decay": None}

    def __init__(self, name: str = "weight_mixup", complement: str = "code", init_std: float = 0.005,
                 train_size: int = -1, folds: int = 5, average_weights: bool = True, stage1: Any = None,
                 inner: Any = None, outer: Any = None, fd: Any = None, stage2: Any = None, **options: Any) -> None:
        super().__init__(name, **options)
        if complement not in COMPLEMENTS:
            raise UserError(f"method.complement={complement!r}; use one of {', '.join(COMPLEMENTS)}")
        self.complement, self.init_std = complement, float(init_std)
        self.train_size, self.folds, self.average_weights = int(train_size), int(folds), bool(average_weights)
        if self.folds < 0:
            raise UserError(f"method.folds={folds} must be >= 0 (0 = no stage 1)")
        self.stage1 = _options(stage1, self.STAGE1, "stage1")
        self.inner = _options(inner, self.INNER, "inner")
        self.outer = _options(outer, self.OUTER, "outer")
        self.fd = _options(fd, self.FD, "fd")
        self.stage2 = _options(stage2, self.STAGE2, "stage2")
        if self.fd["precondition"] not in PRECONDITIONERS:
            raise UserError(f"method.fd.precondition={self.fd['precondition']!r}; use adam or none")
        for level in (self.inner, self.outer):
            if level["schedule"] not in SCHEDULES:
                raise UserError(f"method schedule {level['schedule']!r}; use one of {', '.join(SCHEDULES)}")
        if not 0 < float(self.stage1["train_fraction"]) < 1:
            raise UserError("method.stage1.train_fraction must be in (0, 1) (official: 0.8)")
        self.mixed: dict[str, MixedLinear] = {}
        # stage-1 progress (method state)
        self.stage1_done = False
        self.fold, self.fold_step, self.outer_steps = 0, 0, 0
        self.stage1_time, self.stage1_tokens = 0.0, 0
        self.sums: DiskCopy | None = None  # the running fold sums, on disk (created by the first end_fold)
        self.inner_opt: torch.optim.Optimizer | None = None
        self.outer_opt: torch.optim.Optimizer | None = None
        self._pending_opt: dict[str, Any] | None = None
        self._initial: DiskCopy | None = None  # the pretrained non-mixed parameters (fold resets)
        self._model: nn.Module | None = None
        self._amp: torch.dtype | None = None
        self._window: list[list[float]] = []
        self._window_s = 0.0  # seconds spent in the window's outer steps
        self._lengths: list[int] | None = None  # token counts of the training rows (length-grouped batches)

    # --- set-up -----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.ctx = ctx
        self.mixed = wrap_model(model, self.complement)
        self._model = model
        if self.folds > 0:  # the pretrained state the folds reset to (W resets to W0)
            self._initial = DiskCopy(self.non_mixed_params(model))
        return model

    def alphas(self) -> list[nn.Parameter]:
        return [a for m in self.mixed.values() for a in (m.a1, m.a2)]

    def inner_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Every parameter but a1, a2 (W0 is a buffer): the inner level's and stage 2's W."""
        alpha = {id(a) for a in self.alphas()}
        return [(n, p) for n, p in model.named_parameters() if id(p) not in alpha]

    def non_mixed_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        mixed_w = {id(m.weight) for m in self.mixed.values()}
        return [(n, p) for n, p in self.inner_params(model) if id(p) not in mixed_w]

    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        """The N-example subsample (stratified; the same rows as stress=low_resource with n=N)."""
        n = self.train_size
        if n < 0 or n == len(train):
            return train
        if not 0 < n <= len(train):
            raise UserError(f"method.train_size={n} must be in 1..{len(train)} (the training examples) or -1 for all")
        from robustft.stress import low_resource_rows

        keep = low_resource_rows(np.asarray(train["label"]), n, int(ctx.seed), bool(ctx.task.is_regression))
        log.info("weight_mixup: %d of %d training examples (train_size)", n, len(train))
        return train.select(keep)

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        """Stage 2: AdamW over W (alpha and W0 frozen); lr/weight decay from method.stage2 or the trainer."""
        lr = self.stage2["lr"] if self.stage2["lr"] is not None else trainer.lr
        wd = self.stage2["weight_decay"] if self.stage2["weight_decay"] is not None else trainer.weight_decay
        named = self.inner_params(model)
        groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": float(wd)},
                  {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
        return adamw(groups, float(lr), next(model.parameters()).device)

    # --- stage 1 ----------------------------------------------------------------------------------
    def before_training(self, model: nn.Module, train: Dataset, loop: LoopHandle) -> None:
        if not self.stage1_done and self.folds > 0:
            self.run_stage1(model, train, loop)
        self.stage1_done = True
        for a in self.alphas():  # stage 2: alpha (and W0, a buffer) frozen
            a.requires_grad_(False)
        for disk in (self._initial, self.sums):
            if disk is not None:
                disk.close()
        self._initial = self.sums = self.inner_opt = self.outer_opt = None

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

        Departure: with `stage1.group_by_length` (and the lengths known, see run_stage1) each epoch's
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
        """Pretrained state (W = W0, other parameters as loaded), fresh alpha, fresh optimizers."""
        with torch.no_grad():
            if self._initial is not None:
                self._initial.restore(self.non_mixed_params(model))
            gen = torch.Generator().manual_seed(int(self.ctx.seed) * 1000 + fold)
            for m in self.mixed.values():
                m.weight.copy_(m.weight0)
                for a in (m.a1, m.a2):  # official: N(1, 0.005) per fold, then clamped to [0, 1]
                    a.copy_(torch.normal(1.0, self.init_std, size=tuple(a.shape), generator=gen, dtype=a.dtype))
                m.clamp_()
        self.new_optimizers(model)

    def new_optimizers(self, model: nn.Module) -> None:
        named = self.inner_params(model)
        inner_groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": float(self.inner["weight_decay"])},
                        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
        self.inner_opt = adamw(inner_groups, float(self.inner["lr"]), self.ctx.device)  # fused, as the loop's
        self.outer_opt = torch.optim.AdamW(self.alphas(), lr=float(self.outer["lr"]),
                                           weight_decay=float(self.outer["weight_decay"]))
        self._inner_list = [p for g in self.inner_opt.param_groups for p in g["params"]]
        self._group_of = {id(p): g for g in self.inner_opt.param_groups for p in g["params"]}

    def run_stage1(self, model: nn.Module, train: Dataset, loop: LoopHandle) -> None:
        device, tcfg = self.ctx.device, self.ctx.trainer
        self._amp = loop.amp
        n = len(train)
        if n < 2:
            raise UserError(f"method=weight_mixup needs at least 2 training examples for its folds, got {n}")
        log_every, save_every = int(tcfg.log_every), int(tcfg.save_every)
        self._lengths = [len(x) for x in train["input_ids"]]
        model.train()
        while self.fold < self.folds:
            tr, val = self.fold_split(n, self.fold)
            total = self.steps_per_fold(len(tr))
            if self.fold_step == 0:
                self.start_fold(model, self.fold)
            elif self.inner_opt is None:  # resumed inside a fold
                self.new_optimizers(model)
                self.inner_opt.load_state_dict(self._pending_opt["inner"])
                self.outer_opt.load_state_dict(self._pending_opt["outer"])
            self._pending_opt = None
            while self.fold_step < total:
                t0 = time.perf_counter()
                rows_tr = self.batch_rows(tr, self.fold_step, self.fold, 0)
                rows_val = self.batch_rows(val, self.fold_step, self.fold, 1)
                b_tr = {k: v.to(device) for k, v in collate(train, rows_tr, self.ctx.tokenizer, self.ctx.task.is_regression).items()}
                b_val = {k: v.to(device) for k, v in collate(train, rows_val, self.ctx.tokenizer, self.ctx.task.is_regression).items()}
                stats = self.outer_step(model, b_tr, b_val, self.fold_step, total)
                self.fold_step += 1
                self.outer_steps += 1
                dt = time.perf_counter() - t0
                self.stage1_time += dt
                self._window_s += dt
                # four forward/backward pairs: three on the D_tr batch, one on the D_val batch
                self.stage1_tokens += 3 * int(b_tr["attention_mask"].sum()) + int(b_val["attention_mask"].sum())
                self._window.append(stats)
                if self.outer_steps % log_every == 0 or self.fold_step == total:
                    self.log_window(loop, total)
                if self.outer_steps % save_every == 0 and self.fold_step < total:
                    loop.save()
            self.end_fold(model)
            self.fold, self.fold_step = self.fold + 1, 0
            if self.fold < self.folds:
                loop.save()
        self.average(model)
        self.stage1_done = True
        loop.save()

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
            self._initial.restore(self.non_mixed_params(model))
            for m in self.mixed.values():
                m.weight.copy_(m.weight0)
        self.sums.restore(model.named_parameters(), divisor=self.folds)
        for m in self.mixed.values():
            m.clamp_()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        amp = self._amp
        ctx = torch.autocast(device_type=self.ctx.device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            logits = model(**model_inputs(batch)).logits
        return task_loss(logits, batch["labels"], self.ctx.task.is_regression)

    def set_lrs(self, step: int, total: int) -> None:
        for opt, cfg in ((self.inner_opt, self.inner), (self.outer_opt, self.outer)):
            # official: inner warmup (S * 0.1) // 1 steps (floor), outer S * 0.1 (a float) as passed to HF
            warmup = float(cfg["warmup_ratio"]) * total
            warmup = math.floor(warmup) if opt is self.inner_opt else warmup
            scale = SCHEDULES[cfg["schedule"]](step, warmup, total)
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
        """inner step, hypergradient, outer AdamW step on alpha, clamp: four forward/backward pairs."""
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

    @torch.no_grad()
    def precondition(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """Betty 0.2.0 `darts_preconditioned`: v_i / ((sqrt(mean(beta2 * exp_avg_sq_i)) + eps) / sqrt(1 - beta2^t))."""
        if self.fd["precondition"] == "none":
            return v
        out = []
        for p, vec in zip(self._inner_list, v):
            state = self.inner_opt.state.get(p)
            if not state:  # Betty: step 0 -> infinite denominator -> 0
                out.append(torch.zeros_like(vec))
                continue
            group = self._group_of[id(p)]
            beta2, eps = group["betas"][1], group["eps"]
            t = float(state["step"])
            # beta2 * mean(v) rather than mean(beta2 * v): no weight-sized temporary; stays on the device
            denom = (torch.sqrt(state["exp_avg_sq"].mean() * beta2) + eps) / math.sqrt(1 - beta2**t)
            out.append(vec.div_(denom))  # in place: v is the fresh validation gradient, used only here
        return out

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
        """[d_alpha L(W + eps v) - d_alpha L(W - eps v)] / (2 eps) on one batch, same dropout masks both times.

        Mixed layers add eps v inside their forward/backward (`MixedLinear.delta`). The other parameters
        are perturbed in place from a saved copy of only the entries v touches and restored from it, so W
        ends bit-exactly as it was. For the word embeddings that is the rows the D_val batch looked up
        (v is zero elsewhere): a few MB instead of a perturbed copy of every non-mixed parameter.
        """
        by_id = dict(zip((id(p) for p in self._inner_list), v))
        saved = []  # (parameter, its v, rows or None = all, original values)
        with torch.no_grad():
            for _, p in self.non_mixed_params(model):
                vec = by_id[id(p)]
                rows = vec.ne(0).flatten(1).any(1).nonzero().squeeze(1) if p.dim() > 1 else None
                saved.append((p, vec, rows, p.detach().clone() if rows is None else p.index_select(0, rows)))
        rng = _rng_state(self.ctx.device)
        masks = SameDropout()  # departure: the official passes draw fresh dropout masks
        grads = []
        try:
            for sign in (1.0, -1.0):
                if sign < 0:
                    masks.replay = masks.replayable
                    if not masks.replay:  # the pass drew with ops SameDropout cannot replay: draw them again
                        _set_rng_state(rng, self.ctx.device)
                with torch.no_grad():
                    for p, vec, rows, orig in saved:  # p = orig + sign eps v, the same arithmetic both ways
                        if rows is None:
                            torch.add(orig, vec, alpha=sign * eps, out=p)
                        else:
                            p.index_copy_(0, rows, torch.add(orig, vec.index_select(0, rows), alpha=sign * eps))
                for m in self.mixed.values():
                    m.delta, m.eps = by_id[id(m.weight)], sign * eps
                with frozen(p for p, *_ in saved):  # no gradients (nor input gradients) formed for them
                    with masks if sign > 0 or masks.replay else nullcontext():
                        loss = self.loss(model, batch)
                    grads.append(torch.autograd.grad(loss, self.alphas(), allow_unused=True))
            if masks.replay and masks.masks:
                raise RuntimeError(f"finite difference: {len(masks.masks)} dropout masks recorded but not replayed")
        finally:
            for m in self.mixed.values():
                m.delta, m.eps = None, 0.0
            with torch.no_grad():
                for p, _, rows, orig in saved:
                    if rows is None:
                        p.copy_(orig)
                    else:
                        p.index_copy_(0, rows, orig)
        out = []
        for gp, gn, a in zip(grads[0], grads[1], self.alphas()):
            gp = torch.zeros_like(a) if gp is None else gp
            out.append((gp - (0 if gn is None else gn)) / (2 * eps))
        return out

    # --- reporting ---------------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """Stage-1 cost on top of the loop's (runner convention: cost/total_* cover all training compute)."""
        from robustft.models import count_params

        flops_per_token = 6 * count_params(self._model, non_embedding=True)  # as the loop's cost/train_flops
        return {
            "stage1/outer_steps": self.outer_steps,
            "stage1/wall_s": self.stage1_time,
            "stage1/tokens": self.stage1_tokens,
            "cost/total_flops": train_metrics["cost/train_flops"] + flops_per_token * self.stage1_tokens,
            "cost/total_wall_s": train_metrics["train/wall_s"] + self.stage1_time,
        }

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage1_done": self.stage1_done, "fold": self.fold, "fold_step": self.fold_step,
            "outer_steps": self.outer_steps, "stage1_time": self.stage1_time, "stage1_tokens": self.stage1_tokens,
            "mixed": {n: {"weight": m.weight, "a1": m.a1, "a2": m.a2, "weight0": m.weight0} for n, m in self.mixed.items()},
        }
        if not self.stage1_done:
            state["sums"] = self.sums.load() if self.sums is not None else {}
            if self.fold_step > 0 and self.inner_opt is not None:
                state["optimizers"] = {"inner": self.inner_opt.state_dict(), "outer": self.outer_opt.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        with torch.no_grad():
            for n, tensors in state["mixed"].items():
                m = self.mixed[n]
                for key in ("weight", "a1", "a2", "weight0"):
                    getattr(m, key).copy_(tensors[key])
        self.stage1_done = bool(state["stage1_done"])
        self.fold, self.fold_step = int(state["fold"]), int(state["fold_step"])
        self.outer_steps = int(state["outer_steps"])
        self.stage1_time, self.stage1_tokens = float(state["stage1_time"]), int(state["stage1_tokens"])
        sums = state.get("sums") or {}
        self.sums = DiskCopy(sums.items()) if sums else None
        self._pending_opt = state.get("optimizers")
        self.inner_opt = self.outer_opt = None
