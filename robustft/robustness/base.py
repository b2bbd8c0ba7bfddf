"""The evaluator interface and the runner's entry points.

An evaluator is configured under `robustness.<name>` (conf/robustness/<name>.yaml, multi-select:
`'robustness=[advglue,textfooler]'`). The runner calls `check` on every evaluator before training (so a
misfit or a missing resource fails in seconds, not after hours) and `evaluate` on the best checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

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
        ev = instantiate(section[key])
        ev.name = str(section[key].get("name", key))
        ev.check(cfg.task, data_dir)
        evaluators.append(ev)
    return evaluators


def run_evaluators(evaluators: list[Evaluator], predictor: Predictor, cfg: DictConfig
                   ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Run each evaluator; returns `<name>/<metric>` metrics and each evaluator's per-example records
    (the runner writes them to `eval/<name>/samples.jsonl`)."""
    out: dict[str, float] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    data_dir = resolve_data_dir(cfg.get("data_dir"))
    for ev in evaluators:
        metrics, samples[ev.name] = ev.evaluate(predictor, EvalContext(cfg.task, data_dir, int(cfg.seed)))
        out.update({f"{ev.name}/{k}": v for k, v in metrics.items()})
    return out, samples
