"""Per-example records in the scorecard: which column reads which records, intersection accuracy under
attack, and the attack footer.

A column has per-example records when its score is an accuracy over examples the runs share: clean
accuracy (predictions/<split>.jsonl), AdvGLUE on a single accuracy-scored subset, and an attack's
accuracy under attack (eval/<attack>/samples.jsonl). Other columns (F1, MCC, AdvGLUE's QQP/MRPC/MNLI
means, OOD sets) keep the seed-level statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from robustft.report.collect import ATTACK_CLEAN

ACCURACY_SUBSETS = frozenset({"sst2", "qnli", "rte"})  # AdvGLUE subsets scored by accuracy alone
ATTACK_RESULTS = frozenset({"n", "clean_acc", "acc_under_attack", "attack_success_rate", "n_succeeded",
                            "n_failed", "n_skipped", "wall_s"})
RATE_SUFFIXES = ("_per_s", "_wall_s", "_pct")  # measured speeds and shares: results, not parameters


def record_source(col: Any, runs: list[dict[str, Any]]) -> str | None:
    """The records name a column's score is the accuracy of, or None (seed-level statistics only)."""
    split, _, name = col.metric.partition("/")
    if col.kind == "clean" and name == "accuracy" and split in ("validation", "test"):
        return split
    if col.kind == "attack":
        return split
    if col.kind == "advglue" and col.task != "all":
        subsets = [r.get("records", {}).get(split + "#subsets") for r in runs]
        if subsets and all(s and len(s) == 1 and s <= ACCURACY_SUBSETS for s in subsets):
            return split
    return None


def cell_records(runs: list[dict[str, Any]], col: Any, label_of: Callable[[int], str], task_of: Callable[[int], str]
                 ) -> dict[str, dict[tuple[str, Any], dict[Any, bool]]]:
    """{label: {(task, seed): {id: correct}}} of a column, when every run of its task has the records."""
    mine = [(i, r) for i, r in enumerate(runs) if task_of(i) == col.task and col.metric in r["metrics"]]
    source = record_source(col, [r for _, r in mine])
    if not source or not mine or not all(source in r.get("records", {}) for _, r in mine):
        return {}
    out: dict[str, dict[tuple[str, Any], dict[Any, bool]]] = {}
    for i, r in mine:
        out.setdefault(label_of(i), {}).setdefault((col.task, r["seed"]), r["records"][source])
    return out


def common_correct(runs: list[dict[str, Any]], attack: str) -> set | None:
    """Ids every run classifies correctly before `attack` (A2T's intersection), None without records."""
    sets = [{i for i, ok in r.get("records", {}).get(attack + ATTACK_CLEAN, {}).items() if ok} for r in runs]
    if not runs or any(attack + ATTACK_CLEAN not in r.get("records", {}) for r in runs):
        return None
    return set.intersection(*sets)


def intersection_values(runs: list[dict[str, Any]], attack: str, ids: set, keys: list[Any]
                        ) -> tuple[dict[Any, float], dict[Any, dict[Any, bool]]]:
    """Accuracy under attack of each run on `ids` ({key: value}) and the restricted records ({key: records}),
    keyed by `keys` (one per run)."""
    values, recs = {}, {}
    for key, r in zip(keys, runs):
        kept = {k: v for k, v in r["records"][attack].items() if k in ids}
        recs.setdefault(key, kept)
        values.setdefault(key, float(np.mean(list(kept.values()))) if kept else float("nan"))
    return values, recs


def _describe(value: Any) -> str:
    """A run_info protocol value as short text: {'type': 'MaxModificationRate', 'max_rate': 0.2} ->
    MaxModificationRate(max_rate=0.2); lists joined with '+'; a sha256 cut to 12 characters."""
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_describe(v)}" for k, v in value.items() if k != "type")
        return f"{value['type']}({inner})" if "type" in value else inner
    if isinstance(value, list):
        return " + ".join(_describe(v) for v in value)
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _protocol_params(info: Any) -> dict[str, str]:
    """run_info.json evaluators.<attack> (or <attack>) as flat name -> text; the run seed is left out."""
    out: dict[str, str] = {}
    for name, value in (info.items() if isinstance(info, dict) else ()):
        if name == "attack_seed":  # the run's own seed: differs between seeds by design
            continue
        if isinstance(value, dict) and "type" not in value:
            out.update({f"{name}.{k}": _describe(v) for k, v in value.items()})
        else:
            out[name] = _describe(value)
    return out


def _is_parameter(name: str) -> bool:
    """An attack's metrics.json key that states a setting (n_examples, max_queries), not a result."""
    return name not in ATTACK_RESULTS and not name.startswith("avg_") and not name.endswith(RATE_SUFFIXES)


def attack_params(runs: list[dict[str, Any]], attack: str) -> dict[str, set[str]]:
    """name -> the values the attack's runs recorded: metrics.json keys that are not results, and run_info.json
    `evaluators.<attack>` (sample, ids hash, query budget and its counting, candidates, constraints, search).
    A parameter that some of the attack's runs did not record (runs older than the record) also holds
    '(not recorded by k of n runs)'."""
    params: dict[str, set[str]] = {}
    recorded: dict[str, int] = {}
    attacked = 0
    for r in runs:
        attacked += any(key.startswith(attack + "/") for key in r["metrics"])
        found = [(name, f"{value:g}") for key, value in r["metrics"].items()
                 if key.startswith(attack + "/") and _is_parameter(name := key.removeprefix(attack + "/"))]
        evaluators = r["info"].get("evaluators")
        found += list(_protocol_params(evaluators.get(attack) if isinstance(evaluators, dict)
                                       else r["info"].get(attack)).items())
        for name, text in found:
            params.setdefault(name, set()).add(text)
        for name in {name for name, _ in found}:
            recorded[name] = recorded.get(name, 0) + 1
    for name, n in recorded.items():
        if n < attacked:
            params[name].add(f"(not recorded by {attacked - n} of {attacked} runs)")
    return params


def attack_footer(runs: list[dict[str, Any]], attacks: list[str]) -> list[str]:
    """'textfooler: max_queries=300, n_examples=100, ...'; a parameter whose runs differ lists every value."""
    lines = []
    for attack in attacks:
        if params := attack_params(runs, attack):
            shown = ", ".join(f"{k}={' / '.join(sorted(v))}" for k, v in sorted(params.items()))
            lines.append(f"{attack}: {shown}")
    return lines


def sample_warnings(runs: list[dict[str, Any]], attacks: list[str]) -> list[str]:
    """An attack whose runs did not all score the same recorded sample: its paired comparisons pair runs by
    seed, but not necessarily example by example."""
    out = []
    for attack in attacks:
        hashes = attack_params(runs, attack).get("sample.sha256", set())
        if len(hashes) > 1:
            out.append(f"{attack}: the runs attacked different samples or did not record one (sample.sha256 = "
                       f"{' / '.join(sorted(hashes))}); compare its column with care, or rerun the odd runs")
    return out
