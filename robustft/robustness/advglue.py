"""AdvGLUE (Wang et al. 2021): the dev set, scored as the official evaluate.py does.

Official scoring (AI-secure/adversarial-glue evaluate.py): per task the mean of its GLUE metrics
(accuracy; QQP: accuracy and F1), MNLI = mean of the matched and mismatched task scores, overall = mean
over tasks. A model trained on one task is scored on its subset(s) only, so `overall` is the mean over
the tasks evaluated (the official script expects all six). Plain pooled accuracy sits beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from robustft.errors import UserError
from robustft.predict import Predictor
from robustft.robustness.base import EvalContext, Evaluator
from robustft.robustness.common import label_names, require_classification, resolve_resource

# Fields and label names (GLUE/HF order; AdvGLUE's integer labels use it) of each subset.
SUBSET_FIELDS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "mnli-mm": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
SUBSET_LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mnli-mm": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
}
TASK_SUBSETS: dict[str, tuple[str, ...]] = {
    "sst2": ("sst2",), "qqp": ("qqp",), "mnli": ("mnli", "mnli-mm"), "qnli": ("qnli",), "rte": ("rte",),
}
# Hub configs of AI-Secure/adv_glue (online users; everything here runs from the local dev.json).
HUB_CONFIGS = {"sst2": "adv_sst2", "qqp": "adv_qqp", "mnli": "adv_mnli", "mnli-mm": "adv_mnli_mismatched",
               "qnli": "adv_qnli", "rte": "adv_rte"}


def glue_metrics(subset: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics the official script takes from GLUE: accuracy, plus binary F1 (class 1) for QQP."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    out = {"accuracy": float((preds == labels).mean()) if len(labels) else float("nan")}
    if subset == "qqp":
        tp = int(((preds == 1) & (labels == 1)).sum())
        fp = int(((preds == 1) & (labels == 0)).sum())
        fn = int(((preds == 0) & (labels == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return out


def advglue_scores(results: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> dict[str, float]:
    """Official AdvGLUE scores from {subset: (predictions, labels)}; flat keys for metrics.json.

    `<subset>_<metric>` per subset, `<task>_score` per task (mnli = mean of mnli and mnli-mm),
    `overall` = mean of the task scores (the official "score"), `accuracy` = pooled plain accuracy, `n`.
    """
    out: dict[str, float] = {}
    task_scores: dict[str, float] = {}
    correct = total = 0
    for subset, (preds, labels) in results.items():
        preds, labels = np.asarray(preds), np.asarray(labels)
        m = glue_metrics(subset, preds, labels)
        out.update({f"{subset}_{k}": v for k, v in m.items()})
        out[f"{subset}_n"] = float(len(labels))
        task_scores[subset] = float(np.mean(list(m.values())))
        correct += int((preds == labels).sum())
        total += len(labels)
    if "mnli" in task_scores and "mnli-mm" in task_scores:
        task_scores["mnli"] = (task_scores["mnli"] + task_scores.pop("mnli-mm")) / 2
    out.update({f"{t}_score": s for t, s in task_scores.items()})
    out["overall"] = float(np.mean(list(task_scores.values()))) if task_scores else float("nan")
    out["accuracy"] = correct / total if total else float("nan")
    out["n"] = float(total)
    return out


class AdvGLUE(Evaluator):
    """Scores the model on the AdvGLUE subset(s) of its task (or `subsets`, when their labels match)."""

    def __init__(self, path: str = "advglue/dev.json", hub: str = "AI-Secure/adv_glue",
                 subsets: Sequence[str] | None = None, name: str | None = None) -> None:
        self.path, self.hub = path, hub
        self.subsets = list(subsets) if subsets else None
        if name:
            self.name = name

    def subsets_for(self, task: DictConfig) -> list[str]:
        if self.subsets is None:
            if str(task.name) not in TASK_SUBSETS:
                raise UserError(f"advglue has no subset for task {task.name}; AdvGLUE covers "
                                f"{', '.join(TASK_SUBSETS)}: drop advglue or train on one of them")
            return list(TASK_SUBSETS[str(task.name)])
        unknown = [s for s in self.subsets if s not in SUBSET_FIELDS]
        if unknown:
            raise UserError(f"robustness.{self.name}.subsets has unknown {unknown}; choose from {list(SUBSET_FIELDS)}")
        return list(self.subsets)

    def check(self, task: DictConfig, data_dir: Path | None) -> None:
        require_classification(task, self.name)
        names, n_fields = label_names(task), len(task.text_fields)
        for s in self.subsets_for(task):
            if list(SUBSET_LABELS[s]) != names or len(SUBSET_FIELDS[s]) != n_fields:
                raise UserError(f"advglue subset {s} (labels {list(SUBSET_LABELS[s])}) does not fit task {task.name} "
                                f"(labels {names}); evaluate a model trained on {s.split('-')[0]}")
        if data_dir is not None:
            resolve_resource(self.path, data_dir, "AdvGLUE file", f"robustness.{self.name}.path")

    def load(self, subset: str, data_dir: Path | None) -> list[dict[str, Any]]:
        """Rows of one subset: the local dev.json when a data_dir is set, else the hub."""
        if data_dir is not None:
            data = json.loads(resolve_resource(self.path, data_dir, "AdvGLUE file").read_text("utf-8"))
            if subset not in data:
                raise UserError(f"{self.path} has no '{subset}' subset; use the official AdvGLUE dev.json")
            return list(data[subset])
        from datasets import load_dataset

        from robustft.hub import cache_only_if_unreachable

        try:
            with cache_only_if_unreachable():
                return list(load_dataset(self.hub, HUB_CONFIGS[subset], split="validation"))
        except Exception as e:  # noqa: BLE001 - any hub failure has the same fix
            raise UserError(f"could not load {self.hub}/{HUB_CONFIGS[subset]} ({type(e).__name__}); offline, set "
                            "data_dir to a folder with advglue/dev.json") from None

    def evaluate(self, predictor: Predictor, ctx: EvalContext) -> tuple[dict[str, float], list[dict[str, Any]]]:
        results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        records: list[dict[str, Any]] = []
        names = label_names(ctx.task)
        for subset in self.subsets_for(ctx.task):
            rows = self.load(subset, ctx.data_dir)
            fields = SUBSET_FIELDS[subset]
            labels = np.array([int(r["label"]) for r in rows])
            bad = sorted({int(x) for x in labels} - set(range(len(names))))
            if bad:
                raise UserError(f"AdvGLUE {subset} has labels {bad} outside {names}; use the official dev.json")
            preds = predictor.logits([tuple(str(r[f]) for f in fields) for r in rows]).argmax(axis=1)
            results[subset] = (preds, labels)
            for r, p in zip(rows, preds):
                records.append({"subset": subset, "idx": r["idx"], **{f: r[f] for f in fields},
                                "label": names[int(r["label"])], "pred": names[int(p)],
                                "correct": bool(int(p) == int(r["label"]))})
        return advglue_scores(results), records
