"""The scorecard: rows = methods, columns = clean / AdvGLUE / attack / OOD scores per task and cost.

Built from loaded runs (robustft/report/collect.py) without torch or Hydra. Each cell keeps its values
keyed by (task, seed), so a method and the baseline are compared on the seeds both ran (stats.compare).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustft.report import hygiene
from robustft.report.collect import MISSING, ReportError, lookup
from robustft.report.records import (
    attack_footer,
    cell_records,
    common_correct,
    intersection_values,
    sample_warnings,
)
from robustft.report.stats import Comparison, compare, holm
from robustft.report.stats_examples import compare_examples

ADVGLUE_KEY = "advglue/overall"   # the official AdvGLUE score of the run's task subset(s)
ATTACK_SUFFIX = "/acc_under_attack"
OOD_PATTERN = re.compile(r"^ood/(.+)_accuracy$")
COST_KEY = "cost/total_flops"
MIN_SEEDS = 5
ALL = "all"                       # the task of columns pooled over tasks (AdvGLUE overall)


@dataclass(frozen=True)
class Column:
    """One column: `metric` of metrics.json on `task` (ALL: the mean over tasks per seed)."""

    key: str      # unique id, e.g. "rte|advglue/overall"
    title: str    # e.g. "rte AdvGLUE"
    task: str
    metric: str
    kind: str     # clean | advglue | attack | ood | cost
    selected: bool = False  # scored on the split that selected the checkpoint ("selected on this set")
    common: bool = False    # accuracy under attack on the examples every compared run got right (A2T)


@dataclass
class Scorecard:
    """values[label][column key] = {(task, seed): value}; comparisons[label][column key] vs the baseline."""

    labels: list[str]
    columns: list[Column]
    values: dict[str, dict[str, dict[tuple[str, Any], float]]]
    baseline: str | None
    baseline_of: dict[str, str] = field(default_factory=dict)  # row -> its baseline row (same --label-by values)
    comparisons: dict[str, dict[str, Comparison]] = field(default_factory=dict)
    relative_cost: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> task -> ratio
    warnings: list[str] = field(default_factory=list)
    n_runs: int = 0
    records: dict[str, dict[str, dict[tuple[str, Any], dict]]] = field(default_factory=dict)  # per-example
    majority: dict[str, float] = field(default_factory=dict)   # task -> majority-class rate of its clean split
    collapsed: set[tuple[str, str]] = field(default_factory=set)  # (label, task) with a collapsed run
    footer: list[str] = field(default_factory=list)            # attack parameters the runs recorded
    budget: dict[str, str] = field(default_factory=dict)       # label -> tuning budget, when a row is tuned

    def cell(self, label: str, column: Column) -> dict[tuple[str, Any], float]:
        return self.values.get(label, {}).get(column.key, {})


# ------------------------------------------------------------------------------------------------ labels


def _name(run: dict[str, Any], key: str) -> str | None:
    value = lookup(run, key)
    return None if value in (None, MISSING) else str(value)


def run_label(run: dict[str, Any], label_by: Sequence[str] = (), with_model: bool = False) -> str:
    """Name + suffix of `label_parts`: `match_tuning+rose`, `vanilla[stress.low_resource.n=300]`."""
    return "".join(label_parts(run, label_by, with_model))


def label_parts(run: dict[str, Any], label_by: Sequence[str] = (), with_model: bool = False) -> tuple[str, str]:
    """(`match_tuning+rose` (method + selector unless none), `model:` when models differ, `[k=v]` extras.

    A run's `tag` replaces method+selector: the arms of an experiment recipe (conf/arm/*.yaml) tag their
    runs (e.g. rose_first, rose_second) because several arms share one method.
    """
    label = _name(run, "tag") or _name(run, "method.name") or "?"
    selector = _name(run, "selector.name")
    if selector and selector != "none" and not _name(run, "tag"):
        label += f"+{selector}"
    if with_model:
        label = f"{_name(run, 'model.name') or '?'}:{label}"
    items = label_items(run, label_by)
    suffix = "[" + ",".join(f"{k}={v}" for k, v in items) + "]" if items else ""
    return label, suffix


def label_items(run: dict[str, Any], label_by: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The --label-by (key, value) pairs a run's config has: a key it lacks (selector.variant of a run
    without a selector) is left out of its label, not shown as <missing>."""
    return tuple((k, str(lookup(run, k))) for k in label_by if lookup(run, k) not in (None, MISSING))


def baseline_rows(items_of: dict[str, frozenset], baseline: str | None) -> dict[str, str]:
    """Each row's baseline row: the baseline method with the most of the row's --label-by values and no
    other (vanilla[n=300] for weight_mixup[n=300]; plain vanilla for child_tuning[selector.variant=d])."""
    if not baseline:
        return {}
    bases = {lab: items for lab, items in items_of.items() if lab.split("[")[0] == baseline}
    out = {}
    for lab, items in items_of.items():
        fits = [b for b, b_items in bases.items() if b_items <= items and b != lab]
        if lab.split("[")[0] != baseline and fits:
            out[lab] = max(fits, key=lambda b: len(bases[b]))
    return out


def _main_metric(run: dict[str, Any]) -> str | None:
    value = run["info"].get("main_metric")
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------------- columns


def _task_columns(task: str, runs: list[dict[str, Any]]) -> list[Column]:
    """clean main metric, AdvGLUE, each attack, each OOD set: whatever some run of the task has."""
    keys = {k for r in runs for k in r["metrics"]}
    cols = []
    mains = sorted({clean_metric(m, keys) for r in runs if (m := _main_metric(r)) and m in r["metrics"]})
    for m in mains:
        name = m.partition("/")[2] or m
        title = f"{task} clean" + ("" if name == "accuracy" else f" {name}") + (" (held-out test)" if
                                                                                m.startswith("test/") else "")
        cols.append(Column(f"{task}|{m}", title, task, m, "clean", selected=m.startswith("validation/")))
    if ADVGLUE_KEY in keys:
        cols.append(Column(f"{task}|{ADVGLUE_KEY}", f"{task} AdvGLUE", task, ADVGLUE_KEY, "advglue"))
    on_dev = not any(r["info"].get("selection") == "carve" for r in runs)  # attacks drew from the selection set
    for k in sorted(k for k in keys if k.endswith(ATTACK_SUFFIX)):
        cols.append(Column(f"{task}|{k}", f"{task} {k.removesuffix(ATTACK_SUFFIX)}", task, k, "attack", on_dev))
    for k in sorted(k for k in keys if OOD_PATTERN.match(k)):
        cols.append(Column(f"{task}|{k}", f"{task} OOD {OOD_PATTERN.match(k).group(1)}", task, k, "ood"))
    return cols


def clean_metric(main: str, keys: set[str]) -> str:
    """The clean column's metric: the held-out `test/<name>` when runs have it, else the main metric."""
    split, _, name = main.partition("/")
    return f"test/{name}" if split == "validation" and f"test/{name}" in keys else main


def _collect_values(runs: list[dict[str, Any]], labels: list[str], columns: list[Column],
                    label_of: dict[int, str]) -> tuple[dict, list[str]]:
    values: dict[str, dict[str, dict[tuple[str, Any], float]]] = {lab: defaultdict(dict) for lab in labels}
    seen: dict[tuple[str, str, Any], str] = {}
    warns = []
    for i, run in enumerate(runs):
        label, task = label_of[i], _name(run, "task.name") or "?"
        where = (label, task, run["seed"])
        if where in seen:
            warns.append(f"{label} on {task} has several runs with seed {run['seed']} ({seen[where]}, {run['path']}); "
                         "the first is used: pass --label-by with the option that differs to separate them")
            continue
        seen[where] = str(run["path"])
        for col in columns:
            if col.task == task and col.metric in run["metrics"]:
                values[label][col.key][(task, run["seed"])] = run["metrics"][col.metric]
    return values, warns


def _pooled_advglue(card: Scorecard, tasks: list[str]) -> None:
    """AdvGLUE overall: per seed, the mean of the official per-task scores over the tasks every row has."""
    per_task = {t: next((c for c in card.columns if c.task == t and c.kind == "advglue"), None) for t in tasks}
    common = [t for t, c in per_task.items() if c and all(card.cell(lab, c) for lab in card.labels)]
    if len(common) < 2:
        return
    col = Column(f"{ALL}|{ADVGLUE_KEY}", "AdvGLUE overall", ALL, ADVGLUE_KEY, "advglue")
    for lab in card.labels:
        cells = [card.cell(lab, per_task[t]) for t in common]
        seeds = set.intersection(*({s for _, s in c} for c in cells))
        card.values[lab][col.key] = {(ALL, s): float(np.mean([c[(t, s)] for t, c in zip(common, cells)]))
                                     for s in seeds}
    card.columns.append(col)


# ------------------------------------------------------------------------------------------------- build


def build(runs: list[dict[str, Any]], baseline: str | None = "vanilla", label_by: Sequence[str] = (),
          baseline_required: bool = False, majority: dict[str, float] | None = None) -> Scorecard:
    """The scorecard of completed `runs`; comparisons and relative cost vs `baseline` when it is a row.

    `majority`: task -> majority-class rate of its clean split, for runs without records (collapse check).
    """
    if not runs:
        raise ReportError("no completed runs to report")
    hygiene.check_label_keys(runs, label_by)
    with_model = len({_name(r, "model.name") for r in runs}) > 1
    parts = {i: label_parts(r, label_by, with_model) for i, r in enumerate(runs)}
    label_of = {i: name + suffix for i, (name, suffix) in parts.items()}
    # rows by --label-by values, the baseline first within each; a row's baseline shares its values
    labels = sorted(set(label_of.values()), key=lambda lab: _row_key(lab, parts, baseline))
    baseline_of = baseline_rows({label_of[i]: frozenset(label_items(r, label_by)) for i, r in enumerate(runs)},
                                baseline)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_task[_name(r, "task.name") or "?"].append(r)
    tasks = sorted(by_task)
    columns = [c for t in tasks for c in _task_columns(t, by_task[t])]
    hygiene.config_conflicts(runs, label_of)
    values, warns = _collect_values(runs, labels, columns, label_of)
    if not any(name == baseline for name, _ in parts.values()):
        if baseline_required:
            raise ReportError(hygiene.quote(f"--baseline {baseline} is not a row of the report (rows: "
                                            f"{', '.join(labels)})") + "; pass one of them")
        warns.append(f"no {baseline} runs: no paired comparisons or relative cost (choose a row with --baseline)")
        baseline = None
    card = Scorecard(labels, columns, {lab: dict(v) for lab, v in values.items()}, baseline, baseline_of,
                     warnings=warns, n_runs=len(runs), majority=hygiene.majority_rates(runs, majority or {}))
    _pooled_advglue(card, tasks)
    at_majority = _mark_collapsed(card, runs, label_of)
    _attach_records(card, runs, label_of, at_majority)
    attacks = sorted({c.metric.removesuffix(ATTACK_SUFFIX) for c in columns if c.kind == "attack"})
    card.footer = attack_footer(runs, attacks)
    card.warnings += sample_warnings(runs, attacks)
    card.budget = tuning_budget(runs, label_of)
    if baseline:
        _compare_all(card)
        _relative_cost(card, runs, label_of, tasks)
    card.warnings += seed_warnings(card)
    return card


def _attach_records(card: Scorecard, runs: list[dict[str, Any]], label_of: dict[int, str],
                    at_majority: set[int]) -> None:
    """Per-example records of each column, and an intersection column beside each attack with records.

    The intersection leaves out the runs at the majority class (indices `at_majority`), which get no cell in
    it: a constant predictor is right on one class only and would cut the set to that class's easy examples."""
    def task_of(i: int) -> str:
        return _name(runs[i], "task.name") or "?"

    for col in list(card.columns):
        recs = cell_records(runs, col, label_of.__getitem__, task_of)
        if recs:
            for lab, cells in recs.items():
                card.records.setdefault(lab, {})[col.key] = cells
        if col.kind != "attack" or not recs:
            continue
        attack = col.metric.removesuffix(ATTACK_SUFFIX)
        mine = [i for i in range(len(runs)) if task_of(i) == col.task and col.metric in runs[i]["metrics"]
                and i not in at_majority]
        ids = common_correct([runs[i] for i in mine], attack)
        if ids is None:
            continue
        common = Column(f"{col.key}|common", f"{col.title} on common ({len(ids)})", col.task, col.metric,
                        "attack", col.selected, common=True)
        keys = [(label_of[i], (col.task, runs[i]["seed"])) for i in mine]
        values, cells = intersection_values([runs[i] for i in mine], attack, ids, keys)
        for (lab, key), v in values.items():
            card.values[lab].setdefault(common.key, {}).setdefault(key, v)
            card.records.setdefault(lab, {}).setdefault(common.key, {}).setdefault(key, cells[(lab, key)])
        card.columns.insert(card.columns.index(col) + 1, common)


def _mark_collapsed(card: Scorecard, runs: list[dict[str, Any]], label_of: dict[int, str]) -> set[int]:
    """Rows with a run at the majority class on a task: warned, never marked on that task; returns their indices."""
    names, found = [], set()
    for i, run in enumerate(runs):
        task = _name(run, "task.name") or "?"
        clean = next((c.metric for c in card.columns if c.task == task and c.kind == "clean"), None)
        if hygiene.collapsed(run, clean, card.majority.get(task)):
            card.collapsed.add((label_of[i], task))
            found.add(i)
            names.append(f"{label_of[i]} seed {run['seed']}")
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} runs)" if len(names) > 8 else "")
        card.warnings.append(f"at the majority-class rate (one predicted class, or a clean score within "
                             f"{hygiene.COLLAPSE_MARGIN:.2f} of it): {shown}; their rows are not marked on that task's robustness columns, "
                             "and these runs are left out of its 'on common' example sets")
    return found


def _compare_all(card: Scorecard) -> None:
    """Every method vs the baseline per column: the example-level test where both rows have per-example
    records, else the seed-level t-test; Holm over the methods of each column; the mark is p_holm < 0.05."""
    for col in card.columns:
        pairs = [(lab, base) for lab, base in card.baseline_of.items() if card.cell(lab, col) and card.cell(base, col)]
        comps = {}
        for lab, base in pairs:
            mine, theirs = (card.records.get(r, {}).get(col.key, {}) for r in (lab, base))
            comp = compare_examples(mine, theirs, len(pairs)) if mine and theirs else None
            comps[lab] = comp or compare(card.cell(lab, col), card.cell(base, col), len(pairs))
            # a majority-class run's robust "gains" are the majority class; its clean loss is real and stays
            comps[lab].collapsed = col.kind != "clean" and bool({(lab, col.task), (base, col.task)} & card.collapsed)
        for lab, p in zip(comps, holm([c.p for c in comps.values()])):
            comps[lab].p_holm = p
            card.comparisons.setdefault(lab, {})[col.key] = comps[lab]
    seedwise = sorted({col.title for col in card.columns for comps in card.comparisons.values()
                       if col.key in comps and comps[col.key].test == "seeds"
                       and col.kind in ("clean", "advglue", "attack")})
    if seedwise:
        card.warnings.append(f"no per-example records for {', '.join(seedwise)}: their marks use the paired t-test "
                             "over seeds (weaker; rerun with records, predictions/*.jsonl and eval/*/samples.jsonl)")


def _relative_cost(card: Scorecard, runs: list[dict[str, Any]], label_of: dict[int, str], tasks: list[str]) -> None:
    """Mean cost/total_flops of each row per task over its baseline row's (cost columns, e.g. `0.40x`)."""
    costs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for i, r in enumerate(runs):
        if COST_KEY in r["metrics"]:
            costs[(label_of[i], _name(r, "task.name") or "?")].append(r["metrics"][COST_KEY])
    base_rows = set(card.baseline_of.values()) | ({card.baseline} & set(card.labels))
    for task in tasks:
        for lab in card.labels:
            base = costs.get((lab if lab in base_rows else card.baseline_of.get(lab, ""), task))
            if base and costs.get((lab, task)):
                card.relative_cost.setdefault(lab, {})[task] = float(np.mean(costs[(lab, task)]) / np.mean(base))
        if any(task in card.relative_cost.get(lab, {}) for lab in card.labels):
            card.columns.append(Column(f"{task}|{COST_KEY}", f"{task} cost", task, COST_KEY, "cost"))


def tuning_budget(runs: list[dict[str, Any]], label_of: dict[int, str]) -> dict[str, str]:
    """label -> `12 trials` (a tuned protocol's final runs: the trials its arm's search ran, run_info
    `tuned_from.n_trials`) or `untuned` (the YAML defaults). Empty when no row is tuned: a comparison of tuned
    against untuned arms, or of different budgets, must say so in its main table (Dodge et al. 2019)."""
    trials: dict[str, set] = defaultdict(set)
    for i, r in enumerate(runs):
        tuned = r["info"].get("tuned_from")
        trials[label_of[i]].add(tuned.get("n_trials") if isinstance(tuned, dict) else None)
    if all(ns == {None} for ns in trials.values()):
        return {}
    return {lab: ", ".join("untuned" if n is None else f"{n} trials" for n in sorted(ns, key=lambda n: (n is None, n or 0)))
            for lab, ns in trials.items()}


def _row_key(label: str, parts: dict[int, tuple[str, str]], baseline: str | None) -> tuple:
    """Rows grouped by their --label-by values (numbers in numeric order), the baseline first in each."""
    name, suffix = next(p for p in parts.values() if p[0] + p[1] == label)
    natural = tuple((0, float(tok), "") if re.fullmatch(r"\d+(\.\d+)?", tok) else (1, 0.0, tok)
                    for tok in re.split(r"(\d+(?:\.\d+)?)", suffix))
    return natural, name != baseline, name


# ---------------------------------------------------------------------------------------------- warnings


def _seed_key(seed: object) -> tuple:
    """Seeds in numeric order (1, 2, 10), anything that is not a number after them."""
    return (0, int(seed), "") if str(seed).lstrip("-").isdigit() else (1, 0, str(seed))


def seed_warnings(card: Scorecard) -> list[str]:
    """Unequal seed sets across the rows of a task, and cells with fewer than MIN_SEEDS values."""
    out = []
    for col in card.columns:
        if col.kind != "clean":
            continue
        seeds = {lab: sorted({s for _, s in card.cell(lab, col)}, key=_seed_key) for lab in card.labels
                 if card.cell(lab, col)}
        if len({tuple(s) for s in seeds.values()}) > 1:
            detail = "; ".join(f"{lab}: {','.join(map(str, s))}" for lab, s in seeds.items())
            out.append(f"{col.task}: unequal seed sets ({detail}); comparisons use the seeds both sides have")
    small = [f"{lab} {col.task} (n={len(card.cell(lab, col))})" for col in card.columns if col.kind == "clean"
             for lab in card.labels if 0 < len(card.cell(lab, col)) < MIN_SEEDS]
    if small:
        out.append(f"fewer than {MIN_SEEDS} seeds: {', '.join(small)}; intervals and tests are weak")
    return out


def run_warnings(all_runs: list[dict[str, Any]]) -> list[str]:
    """Runs that are not completed (left out) and runs from different code versions (run_info git_sha)."""
    out = []
    bad = [r for r in all_runs if r["status"] != "completed"]
    if bad:
        counts = Counter(r["status"] for r in bad)
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        examples = ", ".join(str(r["path"]) for r in bad[:3]) + (", ..." if len(bad) > 3 else "")
        out.append(f"left out {len(bad)} run(s) not completed ({detail}): {examples}")
    shas = Counter(str(r["info"].get("git_sha")) for r in all_runs if r["status"] == "completed")
    if len(shas) > 1:
        detail = ", ".join(f"{sha[:12]} ({n} runs)" for sha, n in shas.most_common())
        out.append(f"runs come from {len(shas)} code versions (run_info.json git_sha): {detail}")
    return out


def cell_stats(values: dict[tuple[str, Any], float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; nan for one value) and n."""
    arr = np.array(list(values.values()), dtype=np.float64)
    if not len(arr):
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan, len(arr)
