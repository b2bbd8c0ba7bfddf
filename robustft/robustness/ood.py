"""Out-of-distribution test sets: sentiment (Yelp, IMDB) and NLI (MNLI, MNLI-hard, ANLI) evaluators.

The sets are declared in conf/robustness/ood.yaml (file, reader, raw label -> label name). A set fits
a model when the task is in the set's family and the label names agree, directly or after the
configured 3-way <-> 2-way collapse; labels are always matched by name, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from robustft.errors import UserError
from robustft.ood_sets import (  # noqa: F401  (re-exported for the evaluator's users)
    OODSet,
    clean_textfooler,
    read_set,
    reconcile,
    set_label_names,
    text_fields,
    to_py,
)
from robustft.predict import Predictor
from robustft.robustness.base import EvalContext, Evaluator
from robustft.robustness.common import label_names, require_classification, resolve_resource


class OOD(Evaluator):
    """Accuracy on every selected out-of-distribution set."""

    def __init__(self, catalog: Mapping[str, Any], families: Mapping[str, Sequence[str]], sets: Any = "auto",
                 max_examples: int | None = None, collapse: Mapping[str, str] | None = None,
                 name: str | None = None) -> None:
        self.catalog: dict[str, dict[str, Any]] = {k: dict(to_py(v)) for k, v in to_py(catalog).items()}
        self.families = {k: [str(t) for t in v] for k, v in to_py(families).items()}
        self.sets = sets if isinstance(sets, str) else [str(s) for s in sets]
        self.max_examples = None if max_examples is None else int(max_examples)
        self.collapse = dict(to_py(collapse)) if collapse else None
        if name:
            self.name = name

    def fits(self, set_name: str, task: DictConfig) -> str | None:
        """None if the set fits the task, else the reason it does not."""
        spec = self.catalog[set_name]
        family = str(spec.get("family"))
        if str(task.name) not in self.families.get(family, []):
            return f"it is a {family} set and task {task.name} is not in families.{family} {self.families.get(family, [])}"
        n_fields = text_fields(spec)
        if n_fields != len(task.text_fields):
            return f"it has {n_fields} text field(s) and task {task.name} has {len(task.text_fields)}"
        if reconcile(label_names(task), set_label_names(spec), self.collapse) is None:
            return (f"its labels {set_label_names(spec)} do not match {label_names(task)}"
                    f"{'' if self.collapse else ' (no collapse configured)'}")
        return None

    def selected(self, task: DictConfig) -> list[str]:
        if self.sets == "auto":
            chosen = [s for s, spec in self.catalog.items()
                      if self.fits(s, task) is None and str(task.name) not in (spec.get("skip_for") or [])]
            if not chosen:
                raise UserError(f"ood has no set for task {task.name}; its sets are for "
                                f"{self.families}: drop ood for this task")
            return chosen
        unknown = [s for s in self.sets if s not in self.catalog]
        if unknown:
            raise UserError(f"robustness.{self.name}.sets has unknown {unknown}; choose from {list(self.catalog)}")
        for s in self.sets:
            why = self.fits(s, task)
            if why:
                raise UserError(f"OOD set {s} does not fit task {task.name}: {why}; drop it from robustness.{self.name}.sets")
        return list(self.sets)

    def check(self, task: DictConfig, data_dir: Path | None) -> None:
        require_classification(task, self.name)
        for s in self.selected(task):
            spec = self.catalog[s]
            if data_dir is not None:
                resolve_resource(str(spec["file"]), data_dir, f"OOD set '{s}'", f"robustness.{self.name}.catalog.{s}.file")
            elif not spec.get("hub"):
                raise UserError(f"OOD set '{s}' exists only as a local file; set data_dir=/path/to/data")

    def evaluate(self, predictor: Predictor, ctx: EvalContext) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics: dict[str, float] = {}
        records: list[dict[str, Any]] = []
        model_labels = label_names(ctx.task)
        c = self.collapse or {}
        for s in self.selected(ctx.task):
            data = read_set(s, self.catalog[s], ctx.data_dir, self.max_examples)
            collapsed = bool(reconcile(model_labels, set_label_names(self.catalog[s]), self.collapse))
            raw = [model_labels[i] for i in predictor.logits(data.texts).argmax(axis=1)]
            # 3-way -> 2-way: argmax first, then map the predicted name (as for HANS), not a sum of probs.
            preds = [c.get(p, p) if collapsed else p for p in raw]
            gold = [c.get(g, g) if collapsed else g for g in data.labels]
            correct = np.array([p == g for p, g in zip(preds, gold)])
            metrics[f"{s}_accuracy"] = float(correct.mean()) if len(correct) else float("nan")
            metrics[f"{s}_n"] = float(len(correct))
            for i, (t, g, p, r, ok) in enumerate(zip(data.texts, gold, preds, raw, correct)):
                records.append({"set": s, "row": i, "text": list(t), "label": g, "pred": p, "model_pred": r,
                                "collapsed": collapsed, "correct": bool(ok)})
        return metrics, records
