"""Training dynamics (Dataset Cartography): each training example's logits per epoch.

Logits come from the training forward pass itself (dropout on, as allenai/cartography records them), so
recording costs no extra forward; they are kept on the CPU and written (by the run directory) once per
epoch in cartography's format: `training_dynamics/dynamics_epoch_{e}.jsonl`, rows `{"guid", "logits_epoch_{e}", "gold"}`.

Data parallel (robustft/distributed.py): each rank records the examples of its shards; `epoch_rows` and
`state_dict` gather every rank's records (collectives: every rank calls them, at the same point), so the
epoch's rows hold every example once and a checkpoint (written by rank 0) the partial epoch of all ranks;
`load_state_dict` restores that partial epoch on rank 0 only, so the next gather counts it once.
"""

from __future__ import annotations

from typing import Any

import torch

from robustft import distributed


class TrainingDynamics:
    """Collects (guid, logits, gold) of every training forward; the run directory writes each epoch's rows."""

    def __init__(self) -> None:
        self.idx: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.gold: list[torch.Tensor] = []

    def add(self, idx: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.idx.append(idx.detach().cpu())
        self.logits.append(logits.detach().float().cpu())
        self.gold.append(labels.detach().cpu())

    def epoch_rows(self, epoch: int) -> list[dict[str, Any]]:
        """The epoch's rows in cartography's format, sorted by guid; starts a new epoch."""
        idx, logits, gold = self._gathered()
        order = torch.argsort(idx)
        rows = [{"guid": int(idx[i]), f"logits_epoch_{epoch}": logits[i].tolist(), "gold": gold[i].item()}
                for i in order.tolist()]
        self.idx, self.logits, self.gold = [], [], []
        return rows

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.idx:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0)
        return torch.cat(self.idx), torch.cat(self.logits), torch.cat(self.gold)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's records (this rank's alone in one process)."""
        mine = self._cat()
        if distributed.world_size() == 1:
            return mine
        parts = [p for p in distributed.all_gather_object(mine) if len(p[0])]
        if not parts:
            return mine
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]

    # a partial epoch travels with checkpoints/last so a resumed run writes complete files
    def state_dict(self) -> dict[str, Any]:
        idx, logits, gold = self._gathered()
        return {"idx": idx, "logits": logits, "gold": gold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and len(state.get("idx", [])) and distributed.rank() == 0:
            self.idx, self.logits, self.gold = [state["idx"]], [state["logits"]], [state["gold"]]
