"""Checks of the runs a report pools: unusable records, differing configs under one label, collapsed runs.

A report is only as good as what it pools. These checks turn silent pooling and dropping into errors and
named warnings (issue #26 item 5); the scorecard (robustft/report/scorecard.py) calls them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from robustft.report.collect import MISSING, ReportError, lookup

# Config keys that differ between the seeds of one arm by design (or are paths), not pooled settings.
IGNORED_CONFIG = frozenset({"seed", "data_dir", "ckpt_path", "resume", "train", "hydra", "trainer.device",
                            "trainer.devices"})
COLLAPSE_MARGIN = 0.03  # a clean score within 3 points of the majority-class rate is "at the majority rate"
MAX_QUOTE = 200          # an error line quotes at most this many characters of user data


def quote(text: object, limit: int = MAX_QUOTE) -> str:
    """str(text), cut to `limit` characters with an ellipsis (error lines stay one readable line)."""
    s = str(text).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def usable_runs(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Completed runs whose metrics.json is readable, and a warning per run left out or with NaN metrics."""
    keep, warns = [], []
    for run in runs:
        problem = run.get("metrics_problem")
        if run["status"] == "completed" and problem:
            warns.append(f"left out {quote(run['path'])}: its metrics.json is {problem} (not counted)")
            continue
        if run["status"] == "completed" and run.get("nan_metrics"):
            keys = ", ".join(run["nan_metrics"][:5]) + (", ..." if len(run["nan_metrics"]) > 5 else "")
            warns.append(f"{quote(run['path'])} has NaN metrics ({keys}): those values are not counted")
        keep.append(run)
    return keep, warns


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_conflicts(runs: list[dict[str, Any]], label_of: dict[int, str]) -> None:
    """ReportError when runs pooled under one label and task have different resolved configs.

    Keys every run has but with different values count (seed-valued keys such as stress.seed, paths and
    devices do not); a key only some runs have (added by a later code version) is not a conflict.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for i, run in enumerate(runs):
        groups[(label_of[i], str(lookup(run, "task.name")))].append(run)
    for (label, task), members in groups.items():
        flats = [_flatten(r["config"]) for r in members]
        common = set.intersection(*(set(f) for f in flats)) if flats else set()
        differing = sorted(
            k for k in common
            if k.split(".")[0] not in IGNORED_CONFIG and k not in IGNORED_CONFIG
            and len({repr(f[k]) for f in flats}) > 1
            and not all(f[k] == r["seed"] for f, r in zip(flats, members)))
        if differing:
            shown = " ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
            raise ReportError(quote(f"runs labelled {label} on {task} differ in resolved config keys {shown}", 300)
                              + f"; separate them with --label-by {' '.join(differing[:3])}, or report them apart")


def check_label_keys(runs: list[dict[str, Any]], label_by: Sequence[str]) -> None:
    """ReportError for a --label-by key no run has (a misspelling would otherwise be ignored)."""
    for key in label_by:
        if all(lookup(r, key) in (None, MISSING) for r in runs):
            raise ReportError(f"--label-by key {quote(key)!r} is in no run's .hydra/config.yaml or run_info.json; "
                              "use dotted config keys such as stress.low_resource.n, trainer.lr")


def majority_rates(runs: list[dict[str, Any]], given: dict[str, float]) -> dict[str, float]:
    """Majority-class rate of each task's clean split: from the labels of predictions records, else `given`."""
    out = dict(given)
    for run in runs:
        for split in ("test", "validation"):
            labels = run.get("records", {}).get(split + "#labels")
            if labels:
                out.setdefault(str(lookup(run, "task.name")), max(labels.values()) / sum(labels.values()))
                break
    return out


def collapsed(run: dict[str, Any], clean_metric: str | None, majority: float | None) -> bool:
    """A run that predicts one class on the clean split (records), or scores within COLLAPSE_MARGIN of the
    majority-class rate: its robust "gains" are the majority class, not robustness. The score rule holds with
    records too: a run that predicts a handful of the other class (PGD-K at its defaults on minilm: 0.505
    on SST-2 dev, two classes predicted) is as much at the majority rate as a constant one."""
    records = run.get("records", {})
    preds = next((records[s + "#preds"] for s in ("test", "validation") if s + "#preds" in records), None)
    if preds is not None and len(preds) <= 1:
        return True
    value = run["metrics"].get(clean_metric) if clean_metric else None
    return value is not None and majority is not None and not math.isnan(value) and value <= majority + COLLAPSE_MARGIN
