"""Reading run directories: the loader shared by `robustft-report`, scripts/aggregate.py and scripts/plot.py.

A run is found by its ``run_info.json`` (so any folder layout works, and several sweeps can be read
together); each is read into a plain dict (path, status, seed, info, config, overrides, metrics) so the
report needs neither torch nor Hydra. Moved here from scripts/aggregate.py, which re-exports it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

QUALITY_SUFFIXES = (
    "accuracy", "f1", "matthews_correlation", "pearson", "pearsonr", "spearmanr",
    "combined_score", "overall", "acc_under_attack",
)
IGNORED_OVERRIDES = frozenset({"seed", "data_dir", "ckpt_path", "resume"})  # plus hydra/... and hydra.*
NO_OVERRIDES = "(defaults)"
MISSING = "<missing>"


class ReportError(Exception):
    """A problem with the input that the user can fix; the scripts print it as one line and exit non-zero."""


# ----------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _metrics_problem(path: Path) -> str | None:
    """Why metrics.json cannot be used ('missing', 'not JSON: ...'), None when it is a JSON object."""
    if not path.is_file():
        return "missing"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"unreadable ({type(e).__name__})"
    return None if isinstance(data, dict) else "not a JSON object"


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read one run folder into a dict with keys path, status, seed, info, config, overrides, metrics.

    Also `metrics_problem` (a completed run whose metrics.json is missing or corrupt is left out, with a
    warning, by the report) and `nan_metrics` (keys whose value is NaN: dropped from `metrics`, warned).
    """
    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run_info.json")
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    metrics = _read_json(run_dir / "metrics.json")
    seed = info.get("seed", config.get("seed") if isinstance(config, dict) else None)
    numbers = {k: float(v) for k, v in metrics.items() if _is_number(v)}
    return {
        "metrics_problem": _metrics_problem(run_dir / "metrics.json"),
        # NaN scores are warned; a NaN parameter (an attack's max_queries = no limit) is not a score
        "nan_metrics": sorted(k for k, v in numbers.items() if math.isnan(v) and k.endswith(QUALITY_SUFFIXES)),
        "path": run_dir,
        "status": str(info.get("status", "unknown")),
        "seed": seed,
        "info": info,
        "config": config if isinstance(config, dict) else {},
        "overrides": [str(o) for o in overrides] if isinstance(overrides, list) else [],
        "metrics": {k: v for k, v in numbers.items() if not math.isnan(v)},
        "records": load_records(run_dir),
    }


def load_runs(path: str | Path, include_incomplete: bool = False) -> list[dict[str, Any]]:
    """Every run under `path` (found by recursive search for run_info.json), sorted by folder.

    Only completed runs unless `include_incomplete`; see `skipped_message` to report the others.
    """
    root = Path(path)
    runs = [load_run(p.parent) for p in sorted(root.rglob("run_info.json"))]
    return runs if include_incomplete else [r for r in runs if r["status"] == "completed"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; unreadable lines are skipped (a torn last line of a killed run)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "idx" in row:
            rows.append(row)
    return rows


ATTACK_CLEAN = "#clean"  # records[<attack> + ATTACK_CLEAN]: correct before the attack (status != skipped)


def load_records(run_dir: Path) -> dict[str, dict[Any, bool]]:
    """Per-example correctness of a run, {source: {example id: correct}}, from its kept records.

    Sources: `validation` / `test` from predictions/<split>.jsonl (pred == label), each evaluator from
    eval/<name>/samples.jsonl: attacks (`status`) give correct under attack (status failed: the attack
    did not flip it) and, as `<name>#clean`, correct before it (not skipped); others a `correct` field
    (AdvGLUE; ids are (subset, idx)). Also `<split>#preds`: the set of predicted classes (collapse check)
    and `<split>#labels`: the label counts (majority-class rate), for class labels only (not regression).
    """
    run_dir = Path(run_dir)
    out: dict[str, Any] = {}
    for path in sorted(run_dir.glob("predictions/*.jsonl")):
        rows = _read_jsonl(path)
        if rows:
            out[path.stem] = {r["idx"]: r.get("pred") == r.get("label") for r in rows}
            if all(isinstance(r.get("label"), int) for r in rows):  # classes, not a regression's floats
                out[path.stem + "#preds"] = {str(r.get("pred")) for r in rows}
                out[path.stem + "#labels"] = Counter(str(r.get("label")) for r in rows)
    for path in sorted(run_dir.glob("eval/*/samples.jsonl")):
        rows, name = _read_jsonl(path), path.parent.name
        if rows and all("status" in r for r in rows):
            out[name] = {r["idx"]: r["status"] == "failed" for r in rows}
            out[name + ATTACK_CLEAN] = {r["idx"]: r["status"] != "skipped" for r in rows}
        elif rows and all("correct" in r for r in rows):
            out[name] = {(str(r.get("subset", "")), r["idx"]): bool(r["correct"]) for r in rows}
            out[name + "#subsets"] = {str(r.get("subset", "")) for r in rows}
    return out


def skipped_message(runs: Iterable[dict[str, Any]]) -> str | None:
    """'skipped 2 runs: 1 failed, 1 running' for the runs that are not completed, None if there are none."""
    counts = Counter(r["status"] for r in runs if r["status"] != "completed")
    total = sum(counts.values())
    if not total:
        return None
    detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} run{'s' if total != 1 else ''}: {detail}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- grouping


def _override_key(override: str) -> str:
    """`+trainer.lr=1e-4` -> `trainer.lr`."""
    return override.split("=", 1)[0].lstrip("+~")


def _is_ignored_override(key: str) -> bool:
    return key in IGNORED_OVERRIDES or key == "hydra" or key.startswith(("hydra/", "hydra."))


def lookup(run: dict[str, Any], key: str) -> Any:
    """Value of a dotted config key (`task.name`), a group's name for `task`, else run_info[key]."""
    node: Any = run["config"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            info = run["info"]
            node = info.get(key, info.get(key.removesuffix(".name"), MISSING))
            break
        node = node[part]
    if isinstance(node, dict):
        return node.get("name", json.dumps(node, sort_keys=True))
    return node


def config_items(run: dict[str, Any], group_by: Sequence[str] | None = None) -> tuple[tuple[str, str], ...]:
    """The configuration of a run as (key, value) pairs: its overrides minus seed etc., or `group_by` keys."""
    if group_by:
        return tuple((key, _fmt_value(lookup(run, key))) for key in group_by)
    items = {}
    for override in run["overrides"]:
        key = _override_key(override)
        if not _is_ignored_override(key):
            items[key] = override.split("=", 1)[1] if "=" in override else ""
    return tuple(sorted(items.items()))


def config_label(items: Sequence[tuple[str, str]]) -> str:
    """`method=vanilla,task=rte` (the same format as Hydra's override_dirname)."""
    return ",".join(f"{k}={v}" for k, v in items) if items else NO_OVERRIDES


def _fmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _sort_key(items: tuple[tuple[str, str], ...]) -> tuple:
    """Order configurations by key, then numerically where values are numbers (1e-5 < 2e-5 < 1e-4)."""
    out = []
    for key, value in items:
        try:
            out.append((key, 0, float(value), ""))
        except ValueError:
            out.append((key, 1, 0.0, value))
    return tuple(out)


def group_runs(
    runs: Iterable[dict[str, Any]], group_by: Sequence[str] | None = None
) -> dict[tuple[tuple[str, str], ...], list[dict[str, Any]]]:
    """Runs keyed by their configuration (see `config_items`), in a stable sorted order."""
    runs = list(runs)
    for key in group_by or ():
        if runs and all(lookup(r, key) == MISSING for r in runs):
            raise ReportError(
                f"--group-by key {key[:200]!r} is in no run's .hydra/config.yaml or run_info.json; "
                "use dotted config keys such as method.name, task.name, trainer.lr"
            )
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(config_items(run, group_by), []).append(run)
    return {items: groups[items] for items in sorted(groups, key=_sort_key)}


# -------------------------------------------------------------------------------------------- statistics


def default_metrics(runs: Iterable[dict[str, Any]]) -> list[str]:
    """Main metrics (in order of first appearance), then every quality metric of metrics.json, sorted."""
    runs = list(runs)
    main: list[str] = []
    for run in runs:
        value = run["info"].get("main_metric")
        for key in [value] if isinstance(value, str) else (value or []):
            if key not in main:
                main.append(key)
    others = {k for run in runs for k in run["metrics"] if k.endswith(QUALITY_SUFFIXES) and k not in main}
    return main + sorted(others)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1); nan for an empty list, std nan for a single value."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
    return float(arr.mean()), std
