"""`DiskCopy`: stage-1 buffers parked in temporary safetensors files instead of RAM."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


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

