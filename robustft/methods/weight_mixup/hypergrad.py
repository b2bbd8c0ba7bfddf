"""The pieces of stage 1's hypergradient: Adam preconditioning of v and the finite difference.

The hypergradient is Betty's DARTS-style implicit approximation: with v = P d_W L_val (P the per-tensor
Adam preconditioner of Betty 0.2.0's `darts_preconditioned=True`, or identity) and eps = R / ||v||, R = 0.01,
  g_alpha = d_alpha L_val - [d_alpha L_tr(W + eps v) - d_alpha L_tr(W - eps v)] / (2 eps).
The two finite-difference passes run their backward for alpha only: W and the other parameters enter them
as constants (`frozen`), so no weight gradients are formed. The second pass replays the first one's dropout
masks instead of drawing them again (`SameDropout`). The finite difference never writes the mixed weights:
mixed layers add eps v inside their forward/backward (`MixedLinear.delta`). The other parameters are
perturbed in place and restored from a copy of the entries v touches (for the word embeddings, only the
rows the D_val batch looked up), so W ends bit-exactly what it was.

Departures from the official code: the finite difference restores W exactly (Betty 0.2.0 "restores" W
with an out-of-place `add`, leaving W at W - eps v; fixed in later Betty, commit 7573af4), and both passes
use the same dropout masks (the official passes draw independent masks, whose difference, divided by
2 eps, swamps the derivative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from robustft.checkpoint import set_torch_rng_state, torch_rng_state
from robustft.methods.weight_mixup.dropout import SameDropout
from robustft.methods.weight_mixup.mixed import MixedLinear, alphas

# (parameter, its v, rows or None = all, original values of those rows)
Saved = list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None, torch.Tensor]]


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


@torch.no_grad()
def adam_preconditioned(v: list[torch.Tensor], params: list[nn.Parameter], opt: torch.optim.Optimizer
                        ) -> list[torch.Tensor]:
    """Betty 0.2.0 `darts_preconditioned`: v_i / ((sqrt(mean(beta2 * exp_avg_sq_i)) + eps) / sqrt(1 - beta2^t)).

    `params` are the optimizer's parameters in the order of `v`; v is divided in place.
    """
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for p, vec in zip(params, v):
        state = opt.state.get(p)
        if not state:  # Betty: step 0 -> infinite denominator -> 0
            out.append(torch.zeros_like(vec))
            continue
        group = group_of[id(p)]
        beta2, eps = group["betas"][1], group["eps"]
        t = float(state["step"])
        # beta2 * mean(v) rather than mean(beta2 * v): no weight-sized temporary; stays on the device
        denom = (torch.sqrt(state["exp_avg_sq"].mean() * beta2) + eps) / math.sqrt(1 - beta2**t)
        out.append(vec.div_(denom))  # in place: v is the fresh validation gradient, used only here
    return out


def finite_difference(loss: Callable[[], torch.Tensor], mixed: dict[str, MixedLinear],
                      non_mixed: list[tuple[str, nn.Parameter]], v_of: dict[int, torch.Tensor], eps: float,
                      device: torch.device) -> list[torch.Tensor]:
    """[d_alpha L(W + eps v) - d_alpha L(W - eps v)] / (2 eps), same dropout masks both times; W untouched.

    `loss()` computes the loss of one batch; `v_of` maps id(parameter) to its v for every inner parameter.
    """
    saved = _touched(non_mixed, v_of)
    rng = torch_rng_state(device)
    masks = SameDropout()  # departure: the official passes draw fresh dropout masks
    grads = []
    try:
        for sign in (1.0, -1.0):
            if sign < 0:
                masks.replay = masks.replayable
                if not masks.replay:  # the pass drew with ops SameDropout cannot replay: draw them again
                    set_torch_rng_state(rng, device)
            _perturb(saved, mixed, v_of, sign * eps)
            with frozen(p for p, *_ in saved):  # no gradients (nor input gradients) formed for them
                with masks if sign > 0 or masks.replay else nullcontext():
                    value = loss()
                grads.append(torch.autograd.grad(value, alphas(mixed), allow_unused=True))
        if masks.replay and masks.masks:
            raise RuntimeError(f"finite difference: {len(masks.masks)} dropout masks recorded but not replayed")
    finally:
        _restore(saved, mixed)
    out = []
    for gp, gn, a in zip(grads[0], grads[1], alphas(mixed)):
        gp = torch.zeros_like(a) if gp is None else gp
        out.append((gp - (0 if gn is None else gn)) / (2 * eps))
    return out


@torch.no_grad()
def _touched(non_mixed: list[tuple[str, nn.Parameter]], v_of: dict[int, torch.Tensor]) -> Saved:
    """The entries of the non-mixed parameters v touches, with their values.

    For the word embeddings that is the rows the D_val batch looked up (v is zero elsewhere): a few MB
    instead of a perturbed copy of every non-mixed parameter.
    """
    saved = []
    for _, p in non_mixed:
        vec = v_of[id(p)]
        rows = vec.ne(0).flatten(1).any(1).nonzero().squeeze(1) if p.dim() > 1 else None
        saved.append((p, vec, rows, p.detach().clone() if rows is None else p.index_select(0, rows)))
    return saved


@torch.no_grad()
def _perturb(saved: Saved, mixed: dict[str, MixedLinear], v_of: dict[int, torch.Tensor], step: float) -> None:
    """W + step v: the non-mixed parameters in place (p = orig + step v, the same arithmetic for both signs),
    the mixed weights through their `delta`."""
    for p, vec, rows, orig in saved:
        if rows is None:
            torch.add(orig, vec, alpha=step, out=p)
        else:
            p.index_copy_(0, rows, torch.add(orig, vec.index_select(0, rows), alpha=step))
    for m in mixed.values():
        m.delta, m.eps = v_of[id(m.weight)], step


@torch.no_grad()
def _restore(saved: Saved, mixed: dict[str, MixedLinear]) -> None:
    """W as it was, bit for bit."""
    for m in mixed.values():
        m.delta, m.eps = None, 0.0
    for p, _, rows, orig in saved:
        if rows is None:
            p.copy_(orig)
        else:
            p.index_copy_(0, rows, orig)
