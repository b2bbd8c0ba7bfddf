"""Per-step method statistics averaged over the metrics.jsonl logging window (a helper, not a method)."""

from __future__ import annotations

from typing import Any

import torch


class LogWindow:
    """Running sums of a fixed-length statistics vector since the last metrics.jsonl train row.

    `add` accumulates on the device (no host sync); `flush` is called once per optimizer step, after
    the loop's `loss.item()` has already synchronised, and returns the sums as floats. The window
    restarts after every step that is a multiple of `log_every`, which are exactly the steps where the
    loop writes a train row (the final row, at the last step, then covers the steps since the last one).
    The counter and sums are part of the method state, so a resumed run logs the same values.
    """

    def __init__(self, log_every: int) -> None:
        self.log_every = max(1, int(log_every))
        self.sums: torch.Tensor | None = None
        self.step = 0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        self.sums = values if self.sums is None else self.sums + values

    def flush(self) -> list[float] | None:
        """Sums since the last logged step (None when nothing was added); advances one optimizer step."""
        self.step += 1
        out = None if self.sums is None else self.sums.tolist()
        if self.step % self.log_every == 0:
            self.sums = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sums": None if self.sums is None else self.sums.cpu()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.step = int(state.get("step", 0))
        sums = state.get("sums")
        self.sums = None if sums is None else sums.to(device or "cpu", torch.float64)
