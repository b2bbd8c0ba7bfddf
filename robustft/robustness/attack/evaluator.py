"""The attack evaluator: runs one composed Attack over the task's dev examples."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from robustft.data import held_out_split, load_split, official_source
from robustft.errors import UserError
from robustft.predict import Predictor
from robustft.robustness.attack.attack import Attack, attack_metrics, result_record
from robustft.robustness.attack.constraints import Constraint
from robustft.robustness.attack.goal import UntargetedClassification
from robustft.robustness.attack.search import SearchMethod
from robustft.robustness.attack.transformations import Transformation
from robustft.robustness.base import EvalContext, Evaluator
from robustft.robustness.common import label_names, require_classification

log = logging.getLogger("robustft")


class AttackEvaluator(Evaluator):
    """Attack the first `num_examples` examples of a split (seeded shuffle first if `shuffle`).

    `attack_field` picks the field to perturb: null = the last text field (the hypothesis / second
    sentence of a pair, as TextAttack's InputColumnModification does for NLI), or a field name or index.
    `concurrency` examples are attacked side by side with their model calls merged (results do not
    depend on it, speed does).
    """

    def __init__(self, goal: UntargetedClassification, transformation: Transformation,
                 constraints: Sequence[Constraint], search: SearchMethod, num_examples: int | None = 1000,
                 split: str | None = None, attack_field: str | int | None = None, shuffle: bool = False,
                 log_every: int = 100, concurrency: int = 32, name: str | None = None) -> None:
        self.attack = Attack(goal, transformation, list(constraints), search)
        self.num_examples = None if num_examples is None else int(num_examples)
        self.split, self.attack_field, self.shuffle = split, attack_field, bool(shuffle)
        self.log_every = int(log_every)
        self.concurrency = int(concurrency)
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
        ds = load_split(ctx.task, ctx.data_dir, ctx.seed, self.split or held_out_split(ctx.task))
        if self.shuffle:
            ds = ds.shuffle(seed=ctx.seed)
        if self.num_examples is not None:
            ds = ds.select(range(min(self.num_examples, len(ds))))
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
        return metrics, records
