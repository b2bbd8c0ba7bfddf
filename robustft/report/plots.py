"""report.png (absolute scores) and report_forest_<column>.png (paired differences), matplotlib Agg.

Panels are (task, --label-by group) pairs, e.g. "sst2, stress.low_resource.n=300", wrapped into a grid of
at most NCOLS columns so a report with many groups grows taller, not wider.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from robustft.report.scorecard import Column, Scorecard, cell_stats

NCOLS = 3


def _split(label: str) -> tuple[str, str]:
    """`weight_mixup[stress.low_resource.n=300]` -> (`weight_mixup`, `stress.low_resource.n=300`)."""
    m = re.fullmatch(r"(.*?)(?:\[(.*)\])?", label)
    return (m.group(1), m.group(2) or "") if m else (label, "")


def panels(card: Scorecard) -> list[tuple[str, str]]:
    """(task, group) of every panel, in row order."""
    tasks = [c.task for c in card.columns if c.kind == "clean"]
    groups = list(dict.fromkeys(_split(lab)[1] for lab in card.labels))
    return [(t, g) for t in dict.fromkeys(tasks) for g in groups
            if any(card.cell(lab, c) for lab in card.labels if _split(lab)[1] == g for c in card.columns if c.task == t)]


def _grid(n: int, width: float, height: float, sharex: bool = False) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(NCOLS, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharex=sharex)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _title(task: str, group: str) -> str:
    return f"{task}, {group}" if group else task


def plotted_columns(card: Scorecard, task: str) -> list[Column]:
    """The bars of a task's panel: clean first, then every robust score (AdvGLUE, each attack, each OOD set)."""
    return [c for kind in ("clean", "advglue", "attack", "ood") for c in card.columns if c.task == task and c.kind == kind]


def plot(card: Scorecard, path: Path) -> None:
    """Mean per method of clean and every robust score, error bars = ±1 std over seeds (ddof=1), y-axis
    fitted to the data, the majority-class rate of the task's clean split drawn when known."""
    import matplotlib.pyplot as plt
    import numpy as np

    cells = panels(card)
    fig, axes = _grid(len(cells), 5.5, 4.2)
    for ax, (task, group) in zip(axes, cells):
        labels = [lab for lab in card.labels if _split(lab)[1] == group]
        cols = plotted_columns(card, task)
        x, w = np.arange(len(labels)), 0.8 / max(1, len(cols))
        lows, highs = [], []
        for i, col in enumerate(cols):
            st = [cell_stats(card.cell(lab, col)) for lab in labels]
            means = [s[0] for s in st]
            errs = [0 if math.isnan(s[1]) else s[1] for s in st]
            ax.bar(x + (i - (len(cols) - 1) / 2) * w, means, w, yerr=errs, capsize=2,
                   label=col.title.removeprefix(f"{task} "))
            lows += [m - e for m, e in zip(means, errs) if not math.isnan(m)]
            highs += [m + e for m, e in zip(means, errs) if not math.isnan(m)]
        if task in card.majority:
            ax.axhline(card.majority[task], color="black", ls="--", lw=1,
                       label=f"clean majority class ({card.majority[task]:.3f})")
            lows.append(card.majority[task])
        if lows:
            pad = 0.05 * max(1e-3, max(highs + lows) - min(lows))
            ax.set_ylim(min(lows) - pad, max(highs + lows) + pad)
        ax.set_xticks(x, [_split(lab)[0] for lab in labels], rotation=30, ha="right")
        ax.set_title(_title(task, group))
        ax.set_ylabel("mean score; bars: ±1 std over seeds (ddof=1)", fontsize="small")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def forest_families(card: Scorecard) -> dict[str, list[Column]]:
    """Columns grouped across tasks by what they score: 'clean', 'AdvGLUE', 'textfooler', ..."""
    out: dict[str, list[Column]] = {}
    for col in card.columns:
        if col.kind != "cost" and col.task != "all" and any(col.key in c for c in card.comparisons.values()):
            name = "clean" if col.kind == "clean" else col.title.removeprefix(f"{col.task} ")
            out.setdefault(re.sub(r" \(\d+\)$", "", name), []).append(col)
    return out


def forest(card: Scorecard, family: str, cols: list[Column]) -> Any:
    """One figure: per panel, each method's paired difference vs its baseline with its 95% CI, red, filled
    and starred when marked (Holm-adjusted p < 0.05), hollow otherwise (grey: a majority-class row, never
    marked); a zero line."""
    from matplotlib.ticker import MaxNLocator

    by_task = {c.task: c for c in cols}
    cells = [(t, g) for t, g in panels(card) if t in by_task]
    rows_of = {(t, g): [(lab, card.comparisons[lab][by_task[t].key]) for lab in card.labels
                        if _split(lab)[1] == g and by_task[t].key in card.comparisons.get(lab, {})] for t, g in cells}
    tallest = max((len(r) for r in rows_of.values()), default=1)
    fig, axes = _grid(len(cells), 4.8, 1.2 + 0.32 * max(2, tallest), sharex=True)  # one x scale to compare
    for ax, (task, group) in zip(axes, cells):
        rows = rows_of[(task, group)]
        for y, (_, c) in enumerate(reversed(rows)):
            xerr = [[c.diff - c.ci_low], [c.ci_high - c.diff]] if not math.isnan(c.ci_low) else None
            color = "C3" if c.significant else "0.6" if c.collapsed else "C0"  # grey: majority class, unmarked
            ax.errorbar(c.diff, y, xerr=xerr, fmt="o", color=color, mfc=color if c.significant else "white",
                        capsize=3)
            if c.significant:
                ax.annotate("*", (c.diff, y), textcoords="offset points", xytext=(0, 4), ha="center")
        ax.axvline(0, color="black", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_yticks(range(len(rows)), [_split(lab)[0] for lab, _ in reversed(rows)])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(_title(task, group), fontsize="medium")
        ax.set_xlabel(f"{family}: difference vs {card.baseline} (95% CI)", fontsize="small")
    import textwrap

    key = ("red, filled, *: Holm-adjusted p < 0.05; hollow: not marked; grey: a majority-class row "
           "(never marked)")
    fig.suptitle(textwrap.fill(key, 55 * min(NCOLS, len(cells))), fontsize="small")
    fig.tight_layout()
    return fig


def write_forests(card: Scorecard, out: Path) -> list[Path]:
    """report_forest_<family>.png for every compared column family; returns the paths written."""
    import matplotlib.pyplot as plt

    paths = []
    for family, cols in forest_families(card).items():
        path = out / f"report_forest_{re.sub(r'[^A-Za-z0-9]+', '_', family).strip('_').lower()}.png"
        fig = forest(card, family, cols)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
