"""Outputs of the scorecard: rich table, report.md, report.csv, report.tex (booktabs), report.png.

Cells read "mean ± std (n)"; `*` marks a difference from the baseline whose 95% bootstrap CI excludes 0,
`†` one that does not survive dropping a single seed (sign flip or CI covering 0).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from robustft.report.scorecard import COST_KEY, Column, Scorecard, cell_stats
from robustft.report.stats import Comparison

SIGNIFICANT, FRAGILE = "*", "†"


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def marks(card: Scorecard, label: str, col: Column) -> str:
    comp = card.comparisons.get(label, {}).get(col.key)
    if comp is None or not comp.significant:
        return ""
    return SIGNIFICANT + (FRAGILE if comp.fragile else "")


def cell_text(card: Scorecard, label: str, col: Column) -> str:
    """`0.812 ± 0.014 (5)*`, `0.40x` for cost, `` when the row has no value."""
    if col.kind == "cost":
        ratio = card.relative_cost.get(label, {}).get(col.task)
        return "" if ratio is None else f"{ratio:.2f}x"
    mean, std, n = cell_stats(card.cell(label, col))
    return "" if not n else f"{fmt(mean)} ± {fmt(std)} ({n}){marks(card, label, col)}"


def grid(card: Scorecard) -> tuple[list[str], list[list[str]]]:
    header = ["method", *(c.title for c in card.columns)]
    return header, [[lab, *(cell_text(card, lab, c) for c in card.columns)] for lab in card.labels]


def legend(card: Scorecard) -> str:
    if not card.baseline:
        return "Cells: mean ± std (n seeds)."
    return (f"Cells: mean ± std (n seeds). {SIGNIFICANT} = the paired difference from {card.baseline} "
            f"(same task and seed) has a 95% bootstrap CI that excludes 0; {FRAGILE} = that difference flips "
            f"sign or its CI covers 0 when any single seed is dropped. Cost = mean {COST_KEY} "
            f"relative to {card.baseline}.")


def comparison_rows(card: Scorecard) -> list[tuple[str, Column, Comparison]]:
    return [(lab, col, card.comparisons[lab][col.key]) for lab in card.labels for col in card.columns
            if col.key in card.comparisons.get(lab, {})]


def comparison_cells(lab: str, col: Column, c: Comparison) -> list[str]:
    flags = ("CI excludes 0" if c.significant else "") + (", fragile" if c.fragile else "")
    return [lab, col.title, str(c.n), f"{c.diff:+.3f}", f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
            fmt_p(c.p_t), fmt_p(c.p_holm), fmt_p(c.p_wilcoxon), flags.strip(", ")]


COMPARISON_HEADER = ["method", "column", "pairs", "diff", "95% CI", "p (t)", "p (Holm)", "p (Wilcoxon)", "flags"]


# -------------------------------------------------------------------------------------------- terminal


def print_terminal(card: Scorecard, title: str) -> None:
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 250)
    header, rows = grid(card)
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(escape(name), justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(x) for x in row))
    console.print(table)
    console.print(legend(card))
    for w in card.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


# ---------------------------------------------------------------------------------------------- files


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return [line(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|", *map(line, rows)]


def to_markdown(card: Scorecard, title: str) -> str:
    header, rows = grid(card)
    lines = [f"# {title}", "", *_md_table(header, rows), "", legend(card), ""]
    comps = comparison_rows(card)
    if comps:
        lines += [f"## Paired differences vs {card.baseline}", "",
                  "Over the seeds both have; 95% percentile bootstrap CI of the mean difference; paired t-test, "
                  "Holm-adjusted over the methods of each column; Wilcoxon signed-rank from 6 pairs.", "",
                  *_md_table(COMPARISON_HEADER, [comparison_cells(*c) for c in comps]), ""]
    if card.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in card.warnings), ""]
    return "\n".join(lines)


def _num(x: float | None) -> str | float:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else x


def write_csv(card: Scorecard, path: Path) -> None:
    """Long format: one row per (method, column) with the cell statistics and the comparison."""
    header = ["method", "column", "kind", "task", "metric", "mean", "std", "n", "seeds", "relative_cost",
              "diff", "ci_low", "ci_high", "p_t", "p_holm", "p_wilcoxon", "pairs", "ci_excludes_0", "fragile"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for lab in card.labels:
            for col in card.columns:
                values = card.cell(lab, col)
                rel = card.relative_cost.get(lab, {}).get(col.task) if col.kind == "cost" else None
                if not values and rel is None:
                    continue
                mean, std, n = cell_stats(values)
                seeds = " ".join(str(s) for _, s in sorted(values, key=repr))
                c = card.comparisons.get(lab, {}).get(col.key)
                comp = ([c.diff, c.ci_low, c.ci_high, c.p_t, c.p_holm, c.p_wilcoxon, c.n, c.significant, c.fragile]
                        if c else [""] * 9)
                writer.writerow([lab, col.title, col.kind, col.task, col.metric, _num(mean), _num(std), n or "",
                                 seeds, _num(rel), *map(_num, comp)])


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(text: str) -> str:
    return "".join(TEX_SPECIAL.get(ch, ch) for ch in text)


def _tex_cell(text: str) -> str:
    text = _tex_escape(text).replace("±", r"$\pm$")
    if text.endswith(SIGNIFICANT + FRAGILE):
        return text[:-2] + r"$^{*\dagger}$"
    return text[:-1] + r"$^{*}$" if text.endswith(SIGNIFICANT) else text


def to_latex(card: Scorecard) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    header, rows = grid(card)
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join([_tex_escape(r[0]), *map(_tex_cell, r[1:])]) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def plotted_columns(card: Scorecard, task: str) -> list[Column]:
    """The bars of a task's panel: clean first, then every robust score (AdvGLUE, each attack, each OOD set)."""
    return [c for kind in ("clean", "advglue", "attack", "ood") for c in card.columns if c.task == task and c.kind == kind]


def plot(card: Scorecard, path: Path) -> None:
    """Clean and every robust score per method with ±std error bars, one panel per task (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [c.task for c in card.columns if c.kind == "clean"]
    bars = max((len(plotted_columns(card, t)) for t in tasks), default=2)
    width = max(4.5, 0.6 * bars * len(card.labels))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(width * max(1, len(tasks)), 4), squeeze=False)
    x = np.arange(len(card.labels))
    for ax, task in zip(axes[0], tasks):
        cols = plotted_columns(card, task)
        w = 0.8 / len(cols)
        for i, col in enumerate(cols):
            stats = [cell_stats(card.cell(lab, col)) for lab in card.labels]
            ax.bar(x + (i - (len(cols) - 1) / 2) * w, [s[0] for s in stats], w,
                   yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], capsize=2,
                   label=col.title.removeprefix(f"{task} "))
        ax.set_xticks(x, card.labels, rotation=30, ha="right")
        ax.set_title(task)
        ax.set_ylabel("score")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
