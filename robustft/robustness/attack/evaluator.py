"""The attack evaluator: runs one composed Attack over a fixed sample of the task's held-out split.

The protocol is written down with the scores (A2T, TextDefender): the sample is drawn with task.split_seed
(the same examples for every run seed and method), and its size, ids hash, query budget, candidates and
constraints go into metrics.json (numbers) and run_info.json `evaluators.<name>` (the rest).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from robustft.data import load_split
from robustft.errors import UserError
from robustft.predict import Predictor
from robustft.robustness.attack.attack import Attack, attack_metrics, result_record
from robustft.robustness.attack.constraints import Constraint, MaxModificationRate
from robustft.robustness.attack.goal import UntargetedClassification
from robustft.robustness.attack.search import SearchMethod
from robustft.robustness.attack.transformations import Transformation
from robustft.robustness.base import EvalContext, Evaluator
from robustft.robustness.common import label_names, require_classification
from robustft.splits import held_out_split, ids_sha256, official_source

log = logging.getLogger("robustft")


class AttackEvaluator(Evaluator):
    """Attack a fixed sample of `num_examples` examples of a split (null = all), drawn with task.split_seed.

    `split` null = the held-out split (data.held_out_split: `test`, the official dev, with
    task.selection=carve; else `validation`). The sample is the first `num_examples` of a permutation
    drawn by numpy's default_rng(task.split_seed), kept in dataset order: the same examples for every run
    seed and method (paired comparisons), and a larger sample contains a smaller one. Before, the first N
    examples of the dev file were attacked (SST-2's dev file is not shuffled by label or length, but a
    stated random sample is what A2T/TextDefender-style protocols report).
    `attack_field` picks the field to perturb: null = the last text field (the hypothesis / second
    sentence of a pair, as TextAttack's InputColumnModification does for NLI), or a field name or index.
    `concurrency` examples are attacked side by side with their model calls merged (results do not
    depend on it, speed does).
    """

    def __init__(self, goal: UntargetedClassification, transformation: Transformation,
                 constraints: Sequence[Constraint], search: SearchMethod, num_examples: int | None = 1000,
                 split: str | None = None, attack_field: str | int | None = None,
                 log_every: int = 100, concurrency: int = 32, name: str | None = None) -> None:
        self.attack = Attack(goal, transformation, list(constraints), search)
        self.num_examples = None if num_examples is None else int(num_examples)
        self.split, self.attack_field = split, attack_field
        self.log_every = int(log_every)
        self.concurrency = int(concurrency)
        self.record: dict[str, Any] = {}
        if name:
            self.name = name

    def target_field(self, task: DictConfig) -> int:
        fields = [str(f) for f in task.text_fields]
        if self.attack_field is None:
            return len(fields) - 1
        if isinstance(self.attack_field, int) or str(self.attack_field).lstrip("-").isdigit():
            i = int(self.attack_field)
            if -len(fields) <= i < len(fields):
                return i % len(fields)
        elif str(self.attack_field) in fields:
            return fields.index(str(self.attack_field))
        raise UserError(f"robustness.{self.name}.attack_field={self.attack_field} is not a text field of task "
                        f"{task.name} {fields}; use one of them or null (= the last)")

    def check(self, task: DictConfig, data_dir: Path | None) -> None:
        require_classification(task, self.name)
        self.target_field(task)
        if self.num_examples is not None and self.num_examples < 1:
            raise UserError(f"robustness.{self.name}.num_examples={self.num_examples}; use a positive number or null")
        split = self.split or held_out_split(task)
        source = official_source(task, split, local=data_dir is not None) or "train"  # None: carved out of train
        have = task.get("local") or {} if data_dir is not None else {k: v for k, v in (task.get("hub") or {}).items() if v}
        if split not in ("validation", "test") or source not in have:
            raise UserError(f"robustness.{self.name}.split={split}: task {task.name} has no such split with "
                            f"task.selection={task.get('selection', 'dev')}; use null (the held-out split)")
        self.attack.check(data_dir)

    def evaluate(self, predictor: Predictor, ctx: EvalContext) -> tuple[dict[str, float], list[dict[str, Any]]]:
        self.attack.setup(ctx.data_dir)
        split = self.split or held_out_split(ctx.task)
        full = load_split(ctx.task, ctx.data_dir, ctx.seed, split)
        ds = full.select(sample_rows(len(full), self.num_examples, int(ctx.task.split_seed)))
        self.record = self.protocol_record(ctx, split, len(full), [int(i) for i in ds["idx"]])
        fields = [str(f) for f in ctx.task.text_fields]
        names = label_names(ctx.task)
        target = self.target_field(ctx.task)
        rows = list(ds)
        results: list = []
        t0 = time.perf_counter()
        chunk = max(self.log_every, self.concurrency) if self.log_every else len(rows)
        for start in range(0, len(rows), max(1, chunk)):  # chunks only for progress lines
            part = rows[start : start + chunk]
            examples = [([ex[f] for f in fields], int(ex["label"]), int(ex["idx"])) for ex in part]
            results += self.attack.attack_many(predictor, examples, target, ctx.seed, self.concurrency)
            if self.log_every and len(results) < len(rows):
                m = attack_metrics(results)
                log.info("%s: %d/%d attacked, acc_under_attack %.3f, %.2f ex/s", self.name, len(results), len(rows),
                         m["acc_under_attack"], len(results) / (time.perf_counter() - t0))
        records = [result_record(r, fields, ex["idx"], names) for r, ex in zip(results, rows)]
        metrics = attack_metrics(results)
        elapsed = time.perf_counter() - t0
        queries = sum(r.queries for r in results)
        metrics["examples_per_s"] = len(results) / elapsed if elapsed > 0 else float("nan")
        metrics["queries_per_s"] = queries / elapsed if elapsed > 0 else float("nan")
        metrics.update(self.protocol_metrics(len(rows)))
        return metrics, records

    def protocol_metrics(self, n: int) -> dict[str, float]:
        """The attack's numeric parameters as metrics.json keys (nan = no limit), for a report's footer."""
        rate = next((c.max_rate for c in self.attack.constraints if isinstance(c, MaxModificationRate)), None)
        budget = self.attack.goal.query_budget
        return {"n_examples": float(n), "max_queries": float("nan") if budget is None else float(budget),
                "max_word_rate": float("nan") if rate is None else float(rate)}

    def protocol_record(self, ctx: EvalContext, split: str, n_split: int, ids: list[int]) -> dict[str, Any]:
        """run_info.json `evaluators.<name>`: the sample, budget, candidates, constraints and search."""
        table = getattr(self.attack.transformation, "table", None)
        return {
            "split": split, "split_size": n_split, "selection": str(ctx.task.get("selection", "dev")),
            "sample": {"n": len(ids), "split_seed": int(ctx.task.split_seed), "sha256": ids_sha256(ids),
                "drawn": "first n of numpy default_rng(split_seed).permutation(split size), in split order"},
            "query_budget": self.attack.goal.query_budget,
            "query_counting": "every text the model scores for one example, the clean input included (as "
                              "TextAttack); a request past the budget is cut to what is left, then the search "
                              "ends and an unfooled example counts as failed (robust)",
            "transformation": describe(self.attack.transformation),
            "candidates_per_word_max": max(map(len, table.values())) if table else None,
            "constraints": [describe(c) for c in self.attack.constraints],
            "search": describe(self.attack.search),
            "attack_field": ctx.task.text_fields[self.target_field(ctx.task)],
            "attack_seed": ctx.seed,
        }

    def protocol(self) -> dict[str, Any]:
        return self.record


def sample_rows(n_split: int, n: int | None, split_seed: int) -> list[int]:
    """Rows of the attacked sample: the first `n` of a permutation drawn with `split_seed`, in split order."""
    if n is None or n >= n_split:
        return list(range(n_split))
    return sorted(np.random.default_rng(split_seed).permutation(n_split)[:n].tolist())


def describe(part: Any) -> dict[str, Any]:
    """An attack component as its class and its plain settings (resource tables and word lists left out)."""
    out: dict[str, Any] = {"type": type(part).__name__}
    for key, value in vars(part).items():
        if key.startswith("_") or key == "table":
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
        elif isinstance(value, (list, tuple)) and all(hasattr(v, "__dict__") for v in value):
            out[key] = [describe(v) for v in value]
        elif isinstance(value, (set, frozenset)):
            out[f"n_{key}"] = len(value)
    return out
