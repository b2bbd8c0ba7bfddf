"""`logger=tensorboard`: event files in `<run dir>/tensorboard/` (or `log_dir`), written by torch's SummaryWriter.

Scalars `<split>/<name>` at the global step; at the end the flattened config and the final metrics as
HParams (TensorBoard's HPARAMS tab compares the runs of a sweep) and the run's tags as text. A sweep needs no
extra naming: `tensorboard --logdir multirun/<time>` finds each job in its own sub-folder
(`<overrides>/seed=<seed>/tensorboard`), one per configuration and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustft.loggers.base import RunMeta, Tracker


class TensorBoardTracker(Tracker):
    module = "tensorboard"

    def __init__(self, log_dir: str | None, flush_secs: int, max_queue: int) -> None:
        self.log_dir = log_dir
        self.flush_secs, self.max_queue = int(flush_secs), int(max_queue)
        self.writer: Any = None
        self.meta: RunMeta | None = None
        self.final: dict[str, float] = {}

    def open(self, meta: RunMeta, folder: Path, state: dict[str, Any] | None) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        # a relative log_dir is inside the run directory (handed over by RunDir), an absolute one is the user's
        path = folder if not self.log_dir else meta.run_dir / self.log_dir
        self.meta = meta
        self.writer = SummaryWriter(log_dir=str(path), flush_secs=self.flush_secs, max_queue=self.max_queue)
        return {"log_dir": str(path)}

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=step)
        # on disk before RunDir counts the batch as sent (trackers.json): a kill loses no counted row
        self.writer.flush()

    def log_final(self, metrics: dict[str, float]) -> None:
        self.final.update(metrics)

    def close(self, status: str, tags: dict[str, str]) -> None:
        assert self.meta is not None
        hparams = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
                   for k, v in self.meta.params.items()}
        hparams = {k: ("null" if v is None else v) for k, v in hparams.items()}
        # run_name=".": the HParams summary goes into this run's own folder, not a timestamped sub-folder
        self.writer.add_hparams(hparams, {f"final/{k}": v for k, v in self.final.items()}, run_name=".")
        self.writer.add_text("run", "\n".join(f"- {k}: {v}" for k, v in tags.items()))
        self.writer.close()
