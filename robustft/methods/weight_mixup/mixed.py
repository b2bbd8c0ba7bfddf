"""The mixed linear layer: y = x (alpha * W)^T + b + x (alpha_bar * W0)^T.

W0 is the frozen pretrained weight (its bias unused), W the task weight (starts at W0) and alpha = a1 a2^T a
rank-1 attention (a1: out x 1, a2: 1 x in) kept in [0, 1] by clamping a1 and a2. alpha_bar = (1 - a1)(1 - a2)^T
as in the official `blo.py` (`complement=code`, default), or 1 - alpha as the paper writes it
(`complement=paper`).

Mixed: Q, K, V, attention output, FFN in and out of every encoder layer, and the pooler (BERT/minilm
`bert.pooler.dense`, DeBERTa-v2 `pooler.dense`); never embeddings, LayerNorm or the classification head
(RoBERTa's `classifier.dense` is part of its newly initialised head, so it is not mixed either). The
`nn.Linear` modules are replaced in place by `MixedLinear`, which reuses their `weight`/`bias` Parameters.
(A DeBERTa-v2 config with share_att_key=false also has per-layer pos_key_proj/pos_query_proj; being
attention projections inside the encoder layers, they are mixed too. deberta-v3 shares them with K/Q.)

`MixedLinear` is a custom autograd function that saves only its input (plus references to W, W0, v) and
rebuilds alpha * W + alpha_bar * W0 in backward, so no weight-sized tensor per layer is kept alive between
forward and backward. The finite difference of stage 1 never writes the mixed weights: the layers add
eps v inside their forward/backward (`MixedLinear.delta`).

Checkpoints: `MixedLinear` saves itself as a plain linear layer (`weight` = alpha * W + alpha_bar * W0, its
bias), so `save_pretrained` folders are ordinary HF models (AutoModelForSequenceClassification loads them).
Loading such a folded weight into a MixedLinear sets W to it and a1 = a2 = 1 (alpha_bar = 0 for both
complements), which computes the same layer exactly; that is how the runner's end-of-training restore of
checkpoints/best works. W, a1, a2 and W0 themselves travel in the method state of checkpoints/last.
After `wrap_model` a1 = a2 = 1, so the wrapped model computes exactly the loaded model.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from robustft.errors import UserError

COMPLEMENTS = ("code", "paper")


class Scratch:
    """Reused buffers, one per (slot, dtype, device), grown to the largest layer; shared by a model's layers.

    The mixed layers rebuild Weff in every forward and backward and use it at once, so one buffer per
    slot serves all layers in turn (ops run in order, also on one CUDA stream). Fresh allocations cost
    more than the mixing itself on CPU (measured: 44 ms vs 30 ms per minilm pass over all mixed layers).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like `like`; its contents are whatever the slot's last user left."""
        key = (slot, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buf[: like.numel()].view_as(like)


def mix(weight: torch.Tensor, weight0: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, paper: bool) -> torch.Tensor:
    """alpha * W + alpha_bar * W0 with alpha = a1 a2^T (a rank-1 outer product, by broadcasting); plain autograd ops."""
    alpha = a1 * a2
    if paper:  # the paper: alpha_bar = 1 - alpha
        return alpha * weight + (1 - alpha) * weight0
    return alpha * weight + ((1 - a1) * (1 - a2)) * weight0  # official blo.py: (1 - a1)(1 - a2)^T


@torch.no_grad()
def mix_fast(weight: torch.Tensor, weight0: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, paper: bool,
             scratch: Scratch | None = None) -> torch.Tensor:
    """`mix` without autograd: three passes over the weight (the mixing is memory-bound, so passes are its
    cost); with `scratch` it writes into the scratch buffers (no allocation)."""
    out = scratch.get("mix", weight) if scratch is not None else torch.empty_like(weight)
    tmp = scratch.get("tmp", weight) if scratch is not None else torch.empty_like(weight)
    if paper:  # W0 + alpha (W - W0)
        torch.sub(weight, weight0, out=tmp).mul_(a2)
        return torch.addcmul(weight0, tmp, a1, out=out)
    torch.mul(weight, a2, out=out)  # W a2
    torch.mul(weight0, 1 - a2, out=tmp)  # W0 (1 - a2)
    # a1 (W a2) + (1 - a1) W0 (1 - a2): alpha W + (1 - a1)(1 - a2)^T W0 (official blo.py), in one pass.
    # lerp gives exactly W a2 where a1 = 1, so alpha = 1 is still the plain layer bit for bit.
    return torch.lerp(tmp, out, a1, out=out)


def perturbed(weight: torch.Tensor, delta: torch.Tensor | None, eps: float, scratch: Scratch) -> torch.Tensor:
    """W + eps delta (finite-difference passes) in a scratch buffer; W itself otherwise."""
    return weight if delta is None else torch.add(weight, delta, alpha=eps, out=scratch.get("w", weight))


class _MixedLinearFn(torch.autograd.Function):
    """y = x Weff^T + b, Weff = mix(W + eps delta, W0, a1, a2), saving only x (and references to W, W0, delta).

    Weff is rebuilt in backward, one layer at a time, instead of being kept per layer from forward to
    backward (that would be a second copy of the mixed weights). Gradients are formed only for inputs
    that require them (`needs_input_grad`): the finite-difference passes give W detached, so only d/da1,
    d/da2 and d/dx are computed there.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight0, a1, a2, delta, eps, paper, scratch):
        ctx.save_for_backward(x, weight, weight0, a1, a2, delta)
        ctx.eps, ctx.paper, ctx.scratch = eps, paper, scratch
        w = perturbed(weight, delta, eps, scratch)
        return F.linear(x, mix_fast(w, weight0, a1, a2, paper, scratch), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, weight0, a1, a2, delta = ctx.saved_tensors
        need_x, need_w, need_b, _, need_a1, need_a2 = ctx.needs_input_grad[:6]
        scratch = ctx.scratch
        w = perturbed(weight, delta, ctx.eps, scratch)
        gx = gw = gb = ga1 = ga2 = None
        if need_x:
            gx = grad_out @ mix_fast(w, weight0, a1, a2, ctx.paper, scratch).to(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w or need_a1 or need_a2:
            g = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)  # dL/dWeff, out x in
            if need_a1 or need_a2:
                d = scratch.get("tmp", g)
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
        return gx, gw, gb, None, ga1, ga2, None, None, None, None


class MixedLinear(nn.Module):
    """A linear layer mixing its task weight W with the frozen pretrained W0 through alpha = a1 a2^T.

    Parameters `weight` (W) and `bias` are the wrapped nn.Linear's own Parameters; `a1` (out x 1) and `a2`
    (1 x in) start at 1 (the layer then equals the wrapped one exactly); `weight0` is a non-persistent buffer.
    Its state dict is the folded plain layer (`weight` = Weff, `bias`), see the module docstring.
    `delta`/`eps` (set by the finite difference only) make the layer use W + eps delta without writing W.
    `reference=True` switches to plain autograd ops (double-differentiable; the tests use it).
    `scratch`: the buffers shared with the model's other mixed layers (a private one if not given).
    """

    def __init__(self, linear: nn.Linear, complement: str, scratch: Scratch | None = None) -> None:
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
        self.scratch = scratch if scratch is not None else Scratch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.delta is None else self.weight.detach()  # FD passes: no grad for W
        if self.reference:
            w = weight if self.delta is None else torch.add(weight, self.delta, alpha=self.eps)
            return F.linear(x, mix(w, self.weight0, self.a1, self.a2, self.paper), self.bias)
        return _MixedLinearFn.apply(x, weight, self.bias, self.weight0, self.a1, self.a2, self.delta, self.eps,
                                    self.paper, self.scratch)

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


def wrap_model(model: nn.Module, complement: str, scratch: Scratch) -> dict[str, MixedLinear]:
    """Replace the mixed nn.Linear modules by MixedLinear (sharing `scratch`) in place; returns them by name."""
    names = mixed_linear_names(model)
    if not names:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        raise UserError(f"method=weight_mixup found no encoder-layer linear layers to mix in model_type={mtype!r} "
                        f"({type(model).__name__}); it supports BERT-family (minilm, bert), RoBERTa and DeBERTa-v2")
    mixed = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mixed[name] = MixedLinear(getattr(parent, child), complement, scratch)
        setattr(parent, child, mixed[name])
    return mixed


def alphas(mixed: dict[str, MixedLinear]) -> list[nn.Parameter]:
    """a1, a2 of every mixed layer: the outer level's parameters."""
    return [a for m in mixed.values() for a in (m.a1, m.a2)]


def inner_params(model: nn.Module, mixed: dict[str, MixedLinear]) -> list[tuple[str, nn.Parameter]]:
    """Every parameter but a1, a2 (W0 is a buffer): the inner level's and stage 2's W."""
    alpha = {id(a) for a in alphas(mixed)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in alpha]


def non_mixed_params(model: nn.Module, mixed: dict[str, MixedLinear]) -> list[tuple[str, nn.Parameter]]:
    """The inner parameters but the mixed weights W (embeddings, LayerNorm, biases, head)."""
    mixed_w = {id(m.weight) for m in mixed.values()}
    return [(n, p) for n, p in inner_params(model, mixed) if id(p) not in mixed_w]
