"""Outputs of the scorecard: rich table, report.md, report.csv, report.tex (booktabs), report.png.

Cells read "mean ± std (n)"; `*` marks a difference from the baseline whose Holm-adjusted p < 0.05
(stats.Comparison.significant), `†` one that does not survive dropping a single seed; `‡` on a column
title: scored on the split that selected the checkpoint.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from robustft.report.plots import plot, plotted_columns  # noqa: F401  (re-exported: cli, tests)
from robustft.report.scorecard import COST_KEY, Column, Scorecard, cell_stats
from robustft.report.stats import ALPHA, Comparison

SIGNIFICANT, FRAGILE, SELECTED = "*", "†", "‡"


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


def column_title(col: Column) -> str:
    return col.title + (SELECTED if col.selected else "")


def mdd_text(card: Scorecard, col: Column) -> str:
    """The column's minimum detectable differences (80% power), as a range over its comparisons."""
    values = sorted(c.mdd for lab in card.labels if (c := card.comparisons.get(lab, {}).get(col.key))
                    and not math.isnan(c.mdd))
    if not values:
        return ""
    return f"{values[0]:.3f}" if values[-1] - values[0] < 5e-4 else f"{values[0]:.3f}-{values[-1]:.3f}"


def grid(card: Scorecard) -> tuple[list[str], list[list[str]]]:
    """The main table; a `tuning budget` column after the method when some row is tuned (hydra/sweeper=optuna)."""
    header = ["method", *(column_title(c) for c in card.columns)]
    rows = [[lab, *(cell_text(card, lab, c) for c in card.columns)] for lab in card.labels]
    if card.comparisons:
        rows.append(["MDD (80% power)", *(mdd_text(card, c) for c in card.columns)])
    if card.budget:
        header.insert(1, "tuning budget")
        for row in rows:
            row.insert(1, card.budget.get(row[0], ""))
    return header, rows


def legend(card: Scorecard) -> str:
    std = "std = sample standard deviation over seeds (ddof=1)."
    if card.budget:
        std += (" Tuning budget = the hyperparameter trials the row's setting was chosen from on the selection "
                "split (hydra/sweeper=optuna, docs/tuning.md); untuned = the method's YAML defaults.")
    common = next((c for c in card.columns if c.common), None)
    if common:
        std += (" 'on common (n)' = accuracy under the attack on the n examples that every run of the task "
                "classified correctly before it (A2T's intersection), runs at the majority-class rate left out.")
    selected = (f" {SELECTED} = selected on this set: scored on the split that chose the checkpoint (and early "
                "stopping), so it is optimistic." if any(c.selected for c in card.columns) else "")
    if not card.baseline:
        return f"Cells: mean ± std (n seeds); {std}{selected}"
    return (f"Cells: mean ± std (n seeds); {std} {SIGNIFICANT} = the difference from {card.baseline} has a "
            f"Holm-adjusted p < {ALPHA} (Holm over the methods of the column). The test is the crossed seeds x "
            "examples t-test where both rows have per-example records (test 'examples'), else the paired t-test "
            f"over seeds (test 'seeds'). {FRAGILE} = a marked difference that flips sign or loses p < {ALPHA} "
            "(seeds: its bootstrap CI covers 0) when any single seed is dropped. A row with a run at the "
            "majority-class rate is never marked on that task's robustness columns. MDD = minimum detectable "
            f"difference at 80% power and two-sided alpha {ALPHA}/m (Holm's first step, m methods). Cost = mean {COST_KEY} relative to "
            f"{card.baseline}.{selected}")


def comparison_rows(card: Scorecard) -> list[tuple[str, Column, Comparison]]:
    return [(lab, col, card.comparisons[lab][col.key]) for lab in card.labels for col in card.columns
            if col.key in card.comparisons.get(lab, {})]


def mcnemar_text(c: Comparison) -> str:
    """'2/5 seeds' with exact McNemar p < ALPHA (within-seed tests over examples), '' without records."""
    if not c.mcnemar:
        return ""
    return f"{sum(p < ALPHA for p in c.mcnemar)}/{len(c.mcnemar)} seeds"


def comparison_cells(lab: str, col: Column, c: Comparison) -> list[str]:
    flags = [f for f, on in (("marked", c.significant), ("fragile", c.fragile and c.significant),
                             ("CI excludes 0", c.ci_excludes_0), ("majority class", c.collapsed)) if on]
    units = f"{c.n} x {c.n_examples}" if c.test == "examples" else str(c.n)
    return [lab, column_title(col), c.test, units, f"{c.diff:+.3f}", f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
            fmt_p(c.p), fmt_p(c.p_holm), fmt(c.mdd), fmt_p(c.p_t), mcnemar_text(c), fmt_p(c.p_wilcoxon),
            ", ".join(flags)]


COMPARISON_HEADER = ["method", "column", "test", "seeds (x examples)", "diff", "95% CI", "p", "p (Holm)", "MDD",
                     "p (seed t)", f"McNemar p<{ALPHA}", "p (Wilcoxon)", "flags"]


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
    for line in card.footer:
        console.print(f"attack parameters: {escape(line)}")
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
                  "Over the seeds both have (and, test 'examples', the examples both scored in every one of them). "
                  "'examples': crossed seeds x examples t-test (Satterthwaite df) and its 95% CI; exact McNemar "
                  "within each seed. 'seeds': paired t-test over seeds, 95% percentile bootstrap CI. p (Holm): "
                  "Holm over the methods of each column; the mark is p (Holm) < 0.05. Wilcoxon from 6 pairs. "
                  "See docs/statistics.md.", "",
                  *_md_table(COMPARISON_HEADER, [comparison_cells(*c) for c in comps]), ""]
    if card.footer:
        lines += ["## Attack parameters", "", *(f"- {line}" for line in card.footer), ""]
    if card.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in card.warnings), ""]
    return "\n".join(lines)


def _num(x: float | None) -> str | float:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else x


def write_csv(card: Scorecard, path: Path) -> None:
    """Long format: one row per (method, column) with the cell statistics and the comparison."""
    header = ["method", "column", "kind", "task", "metric", "mean", "std", "n", "seeds", "relative_cost",
              "diff", "ci_low", "ci_high", "p_t", "p_holm", "p_wilcoxon", "pairs", "ci_excludes_0", "fragile",
              "test", "p", "mdd", "n_examples", "mcnemar_p", "marked", "selected", "tuning_budget"]
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
                comp = ([c.diff, c.ci_low, c.ci_high, c.p_t, c.p_holm, c.p_wilcoxon, c.n, c.ci_excludes_0, c.fragile,
                         c.test, c.p, c.mdd, c.n_examples or "", " ".join(f"{p:.4g}" for p in c.mcnemar),
                         c.significant] if c else [""] * 15)
                writer.writerow([lab, col.title, col.kind, col.task, col.metric, _num(mean), _num(std), n or "",
                                 seeds, _num(rel), *map(_num, comp), col.selected, card.budget.get(lab, "")])


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
             " & ".join(_tex_escape(h).replace(SELECTED, r"$^\ddagger$") for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join([_tex_escape(r[0]), *map(_tex_cell, r[1:])]) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", "", r"\par\footnotesize " + _tex_escape(legend(card))
              .replace("±", r"$\pm$").replace(SELECTED, r"$\ddagger$").replace(FRAGILE, r"$\dagger$"), ""]
    return "\n".join(lines)
