"""`SameDropout`: the second finite-difference pass replays the first one's dropout masks.

Departure from the official code: its two finite-difference passes draw independent dropout masks, whose
difference, divided by 2 eps, swamps the derivative. Here both passes use the same masks (recorded in the
first pass and replayed, or drawn again from the restored RNG state when a pass draws in a way that
cannot be replayed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented hook for op-level modes


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
