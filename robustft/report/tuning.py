"""Expected validation performance of a hyperparameter search (Dodge et al., EMNLP 2019, "Show Your Work").

For each arm (a study of `hydra/sweeper=optuna`, one grid cell), the expected best selection-split score
after n trials, n = 1..N, with its spread, from the N trials run. Estimator: the unbiased one of Tang et al.
(2020, "Showing Your Work Doesn't Always Work"): the mean of the maximum over all size-n subsets of the N
scores, E_n = sum_i v_(i) C(i-1, n-1) / C(N, n) with v_(1) <= ... <= v_(N). Dodge et al.'s estimator draws
n with replacement from the empirical distribution, sum_i v_(i) ((i/N)^n - ((i-1)/N)^n), which is biased
low for n near N (at n = N it is below the observed maximum); both are here, the unbiased one is reported.
The spread is the standard deviation of that subset maximum. Both assume independent trials: random
search, the sweeper's default sampler; with TPE the curve only describes the run.

Trials are read from the sweep's records (`<sweep>/trials/<arm>/<number>/`, run_info.json + metrics.json),
so no Optuna is needed to report; a failed trial counts in the arm's budget but has no score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def expected_max(values: list[float], n: int, estimator: str = "unbiased") -> tuple[float, float]:
    """(expected maximum of n trials, its standard deviation) from the observed scores."""
    v = np.sort(np.asarray(values, dtype=float))
    big_n = len(v)
    if not 1 <= n <= big_n:
        raise ValueError(f"n={n} must be between 1 and the number of scores ({big_n})")
    i = np.arange(1, big_n + 1)
    if estimator == "unbiased":  # P(the subset max is the i-th smallest) = C(i-1, n-1) / C(N, n)
        w = np.array([math.comb(k - 1, n - 1) for k in i], dtype=float) / math.comb(big_n, n)
    elif estimator == "dodge":
        w = (i / big_n) ** n - ((i - 1) / big_n) ** n
    else:
        raise ValueError(f"estimator={estimator}; use unbiased or dodge")
    mean = float(w @ v)
    return mean, float(math.sqrt(max(float(w @ (v - mean) ** 2), 0.0)))


def is_tuned_sweep(path: Path) -> bool:
    return (Path(path) / "trials").is_dir()


def load_trials(sweep: Path) -> dict[str, dict[str, Any]]:
    """arm -> {scores, failed, label, metric} from `<sweep>/trials/<arm>/<number>/` records."""
    arms: dict[str, dict[str, Any]] = {}
    for info_path in sorted(Path(sweep).glob("trials/*/*/run_info.json")):
        arm = info_path.parent.parent.name
        info = json.loads(info_path.read_text())
        entry = arms.setdefault(arm, {"scores": [], "failed": 0, "label": info.get("tag") or info.get("method"),
                                      "metric": info.get("main_metric")})
        metrics_path = info_path.parent / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        key = str(info.get("main_metric"))
        if key.startswith("test/"):  # the search's objective is never the held-out split
            raise ValueError(f"{info_path}: main_metric {key} is the held-out split")
        value = metrics.get(key)
        if info.get("status") == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
            entry["scores"].append(float(value))
        elif info.get("status") != "running":
            entry["failed"] += 1
    return arms


def curves(arms: dict[str, dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    return {arm: [(n, *expected_max(a["scores"], n)) for n in range(1, len(a["scores"]) + 1)]
            for arm, a in arms.items() if a["scores"]}


def table(arms: dict[str, dict[str, Any]], digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """Per arm: budget (trials, failed), expected max at 1, 2, 4, ... trials and at all of them, best."""
    cs = curves(arms)
    longest = max((len(c) for c in cs.values()), default=0)
    ns = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n <= longest} | ({longest} if longest else set()))
    header = ["arm", "label", "trials", "failed", *(f"E[max] n={n}" for n in ns), "best"]
    rows = []
    for arm, a in arms.items():
        curve = {n: (m, s) for n, m, s in cs.get(arm, [])}
        cells = [f"{curve[n][0]:.{digits}f} ± {curve[n][1]:.{digits}f}" if n in curve else "" for n in ns]
        best = f"{max(a['scores']):.{digits}f}" if a["scores"] else ""
        rows.append([arm, str(a["label"]), str(len(a["scores"]) + a["failed"]), str(a["failed"]), *cells, best])
    return header, rows


def plot(arms: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    metric = next((a["metric"] for a in arms.values() if a["metric"]), "selection score")
    for arm, curve in curves(arms).items():
        n, mean, std = (np.array(x) for x in zip(*curve))
        ax.plot(n, mean, marker="o", ms=3, label=arm)
        ax.fill_between(n, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("trials (hyperparameter assignments)")
    ax.set_ylabel(f"expected max {metric}")
    ax.set_title("Expected validation performance\n(Tang et al. 2020 estimator, ± 1 sd)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(sweeps: list[Path], out: Path) -> str:
    """expected_max.md/.csv/.png for the trials of the tuned sweeps; returns the markdown section."""
    import csv

    arms: dict[str, dict[str, Any]] = {}
    for sweep in sweeps:
        for arm, a in load_trials(sweep).items():
            merged = arms.setdefault(arm, {"scores": [], "failed": 0, "label": a["label"], "metric": a["metric"]})
            merged["scores"] += a["scores"]
            merged["failed"] += a["failed"]
    header, rows = table(arms)
    lines = ["## Tuning budget and expected validation performance", "",
             "Each arm's search: trials run (failed ones count in the budget, without a score) and the expected "
             "best selection-split score after n trials (Tang et al. 2020's unbiased estimator of Dodge et "
             "al. 2019's curve, ± its standard deviation); expected_max.png draws it for every n.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "expected_max.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "n", "expected_max", "std"])
        for arm, curve in curves(arms).items():
            w.writerows([arm, n, f"{m:.6f}", f"{s:.6f}"] for n, m, s in curve)
    plot(arms, out / "expected_max.png")
    section = "\n".join(lines) + "\n"
    (out / "expected_max.md").write_text(section)
    return section
