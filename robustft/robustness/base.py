"""The evaluator interface and the runner's entry points.

An evaluator is configured under `robustness.<name>` (conf/robustness/<name>.yaml, multi-select:
`'robustness=[advglue,textfooler]'`). The runner calls `check` on every evaluator before training (so a
misfit or a missing resource fails in seconds, not after hours) and `evaluate` on the best checkpoint.

Data-parallel runs (robustft/distributed.py): the runner calls `run_evaluators` on every rank with the same
model; it hands the evaluators a `ShardedPredictor`, so every evaluator runs unchanged on every rank and
only the model's forward passes are split between the ranks (see `ShardedPredictor` for why the split is
by batch, not by example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from robustft import distributed
from robustft.data import resolve_data_dir
from robustft.predict import Predictor


@dataclass
class EvalContext:
    task: DictConfig  # the task the model was trained on
    data_dir: Path | None  # local data bundle (None = hub)
    seed: int


class Evaluator:
    """Base class. `name` is the metrics.json prefix: metrics land as `<name>/<metric>`."""

    name: str = "evaluator"

    def check(self, task: DictConfig, data_dir: Path | None) -> None:
        """Raise UserError if this evaluator cannot run for `task` (wrong task, missing file)."""

    def evaluate(self, predictor: Predictor, ctx: EvalContext) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Return flat metrics (without the name prefix) and per-example records for samples.jsonl."""
        raise NotImplementedError


def build_evaluators(cfg: DictConfig) -> list[Evaluator]:
    """Instantiate and check every selected evaluator (before any training starts)."""
    section = cfg.get("robustness") or {}
    evaluators: list[Evaluator] = []
    data_dir = resolve_data_dir(cfg.get("data_dir"))
    for key in section:
        if "_target_" not in section[key]:  # a recipe's options of an evaluator `robustness=[...]` left out
            continue
        ev = instantiate(section[key])
        ev.name = str(section[key].get("name", key))
        ev.check(cfg.task, data_dir)
        evaluators.append(ev)
    return evaluators


class ShardedPredictor:
    """A `Predictor` whose forward passes are split between the ranks of a data-parallel job.

    Every rank runs the evaluator itself (data loading, the attack searches) on all examples; each
    `logits(texts)` call cuts `texts` into exactly the length-sorted batches the single-process Predictor
    would form (`Predictor._batches`), each rank scores a contiguous share of those batches
    (`distributed.shard_bounds`) and the logits are gathered in order (`distributed.gather_in_order`), so
    every rank gets the full array, bit for bit the single-process one: the same batches, padded alike.

    Why not split the examples instead: an attack merges the requests of `concurrency` examples into one
    predictor call, so which texts share a padded batch depends on which examples run side by side, and
    logits can differ in the last float bits with the padding, which can flip a near-tie in a greedy
    search. Splitting batches keeps every record and metric equal to a single-process evaluation of the
    same model. The price: the search itself (cheap, CPU) runs on every rank, and each call costs one
    all-gather; a call with fewer batches than ranks leaves some ranks idle.
    """

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.queries = 0  # texts scored by the whole job, as a single-process Predictor counts them
        self.calls = 0  # the same on every rank (every rank makes the same calls)

    @property
    def unk_token(self) -> str:
        return self.inner.unk_token

    def logits(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        self.queries += len(texts)
        if distributed.world_size() == 1 or not texts:
            return self.inner.logits(texts)
        p = self.inner
        enc, batches = p.encode(texts)
        # which rank takes the extra batches rotates with the call, so calls of one batch spread over the ranks
        self.calls += 1
        world = distributed.world_size()
        start, stop = distributed.shard_bounds(len(batches), world, (distributed.rank() + self.calls) % world)
        mine = [(rows, p.score(enc, rows)) for rows in batches[start:stop]]
        out = np.empty((len(texts), p.model.config.num_labels), dtype=np.float32)
        for rows, logits in distributed.gather_in_order(mine):  # rows place them: any rank order will do
            out[rows] = logits
        return out

    def probs(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        return Predictor.probs(self, texts)  # the same softmax over this class's logits


def run_evaluators(evaluators: list[Evaluator], predictor: Predictor, cfg: DictConfig
                   ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Run each evaluator; returns `<name>/<metric>` metrics and each evaluator's per-example records
    (the runner writes them to `eval/<name>/samples.jsonl`).

    Under data parallelism every rank calls this with the same model and gets the same records; the
    metrics are rank 0's on every rank (they differ only in timing fields such as examples_per_s, which
    are then the wall-clock rate of the whole job: every rank waits for every forward).
    """
    out: dict[str, float] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    data_dir = resolve_data_dir(cfg.get("data_dir"))
    scorer = ShardedPredictor(predictor) if distributed.world_size() > 1 else predictor
    for ev in evaluators:
        metrics, samples[ev.name] = ev.evaluate(scorer, EvalContext(cfg.task, data_dir, int(cfg.seed)))
        out.update({f"{ev.name}/{k}": v for k, v in metrics.items()})
    return distributed.broadcast_object(out), samples
