#!/usr/bin/env python
"""Aggregate a robustft sweep: mean ± std over seeds for every configuration.

Examples::

    python scripts/aggregate.py multirun/2024-05-01_12-00-00
    python scripts/aggregate.py multirun/... --metrics validation/accuracy advglue/overall
    python scripts/aggregate.py multirun/... --group-by method.name task.name
    python scripts/aggregate.py multirun/... --relative-to method=vanilla --cost-metric cost/total_flops

Runs are found by searching the folder recursively for ``run_info.json`` (the layout of the folder does
not matter, so several sweeps can be aggregated together by pointing at their common parent). Only runs
whose status is ``completed`` are used; the others are counted and reported.

Configuration of a run
    By default, its Hydra overrides (``.hydra/overrides.yaml``) minus ``seed``, ``data_dir``,
    ``ckpt_path``, ``resume`` and anything under ``hydra`` (e.g. ``hydra/launcher``), so the seeds of one
    configuration form one group. With ``--group-by KEY ...`` it is instead the values of those keys read
    from ``.hydra/config.yaml`` (dotted, e.g. ``task.name``, ``trainer.lr``; a config group such as
    ``method`` stands for its ``name``), falling back to ``run_info.json`` (``task``, ``method``, ...).

Default metrics
    Each run's ``main_metric`` (from ``run_info.json``) first, then, alphabetically, every key of
    ``metrics.json`` that ends in one of ``QUALITY_SUFFIXES`` (accuracy, f1, matthews_correlation,
    pearson(r), spearmanr, combined_score, overall, acc_under_attack). Losses, throughputs and costs are
    left out unless asked for with ``--metrics``; ``--metrics wall_time_s`` gives each run's whole wall time
    from ``run_info.json`` (training, evaluation and attacks; ``cost/total_wall_s`` is the training stages').

Statistics
    Mean and sample standard deviation (ddof=1) over the runs of a configuration that have the metric;
    the std of a single run is undefined (``n/a`` in tables, empty in CSV files).

Relative cost (``--relative-to KEY=VALUE --cost-metric METRIC``)
    The mean cost of each configuration divided by the mean cost of its reference configuration: the
    one whose KEY is VALUE and whose other keys are equal (with the default grouping, override keys
    under ``KEY.`` such as ``method.alpha`` do not count as other keys). E.g. ``--relative-to
    method=vanilla`` compares every method with vanilla fine-tuning on the same task, like the compute
    column of the FTFT paper. Configurations without a reference get ``n/a``.

Outputs (in ``--out``, default the sweep folder)
    ``summary.md`` (Markdown table), ``summary.csv`` (one row per configuration: config, n, and per metric
    ``<metric>_mean``, ``<metric>_std``, ``<metric>_n``), ``runs.csv`` (one row per completed run: config,
    seed, every metric of metrics.json, wall_time_s, run_dir).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# The run loader lives in the package (robustft/report/collect.py, shared with `robustft-report`);
# re-exported here so `import aggregate` (scripts/plot.py, tests) keeps working.
from robustft.report.collect import (  # noqa: F401
    IGNORED_OVERRIDES,
    MISSING,
    NO_OVERRIDES,
    QUALITY_SUFFIXES,
    config_items,
    config_label,
    default_metrics,
    group_runs,
    load_run,
    load_runs,
    lookup,
    mean_std,
    skipped_message,
)
from robustft.report.collect import ReportError as AggregateError

PROG = "aggregate.py"


# -------------------------------------------------------------------------------------------- statistics


WALL_TIME = "wall_time_s"  # run_info.json's, not a metrics.json key


def run_value(run: dict[str, Any], metric: str) -> float | None:
    """A metrics.json value of a run, or its run_info.json wall time for WALL_TIME; None when absent."""
    value = run["info"].get(WALL_TIME) if metric == WALL_TIME else run["metrics"].get(metric)
    return None if value is None else float(value)


def summarise(
    runs: Iterable[dict[str, Any]], metrics: Sequence[str], group_by: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per configuration: config (label), items, n, seeds, runs, stats[metric] = {mean, std, n}.

    Pass completed runs only (as `load_runs` returns by default).
    """
    rows = []
    for items, group in group_runs(runs, group_by).items():
        stats = {}
        for metric in metrics:
            values = [v for r in group if (v := run_value(r, metric)) is not None]
            mean, std = mean_std(values)
            stats[metric] = {"mean": mean, "std": std, "n": len(values)}
        seeds = [r["seed"] for r in group]
        rows.append({
            "config": config_label(items),
            "items": items,
            "n": len(group),
            "seeds": seeds,
            "duplicate_seeds": sorted({s for s in seeds if seeds.count(s) > 1}, key=str),
            "runs": group,
            "stats": stats,
        })
    return rows


def parse_key_value(text: str) -> tuple[str, str]:
    """`method=vanilla` -> ('method', 'vanilla')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise AggregateError(f"--relative-to expects KEY=VALUE such as method=vanilla, got {text!r}")
    return key, value


def _same_key(a: str, b: str) -> bool:
    """`method` and `method.name` name the same thing."""
    return a == b or a.removesuffix(".name") == b.removesuffix(".name")


def add_relative_cost(rows: list[dict[str, Any]], key: str, value: str, cost_metric: str) -> None:
    """Set row['cost'] (mean of `cost_metric`) and row['relative_cost'] (cost / cost of the reference).

    The reference of a row is the row whose `key` equals `value` and whose other keys are the same
    (keys under `key.`, e.g. method.alpha for method, are ignored). Rows without one get nan.
    """
    if not any(cost_metric in r["metrics"] for row in rows for r in row["runs"]):
        raise AggregateError(f"--cost-metric {cost_metric!r} is in no run's metrics.json; "
                             "pass a key of metrics.json such as cost/train_flops")

    base = key.removesuffix(".name")

    def split(items: tuple[tuple[str, str], ...]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
        own = [v for k, v in items if _same_key(k, key)]
        rest = tuple((k, v) for k, v in items if not _same_key(k, key) and not k.startswith(f"{base}."))
        return (own[0] if own else None), rest

    references: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for row in rows:
        own, rest = split(row["items"])
        if own == value:
            references.setdefault(rest, []).append(row)
    if not references:
        raise AggregateError(
            f"no configuration has {key}={value} (configurations: {', '.join(r['config'] for r in rows)}); "
            "pass --relative-to with a key and value that appear there"
        )
    for row in rows:
        row["cost"] = mean_std([r["metrics"][cost_metric] for r in row["runs"] if cost_metric in r["metrics"]])[0]
    for row in rows:
        refs = references.get(split(row["items"])[1], [])
        # Several references only when there are extra `key.*` overrides: the plain `key=value` one wins.
        refs = sorted(refs, key=lambda r: len(r["items"]))
        ref_cost = refs[0]["cost"] if refs else math.nan
        row["relative_cost"] = row["cost"] / ref_cost if ref_cost and not math.isnan(ref_cost) else math.nan


# ---------------------------------------------------------------------------------------------- output


def fmt_number(x: float) -> str:
    """3 decimals for scores, 3 significant digits for big or tiny numbers, n/a for nan."""
    if x is None or math.isnan(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.3f}"


def format_stat(mean: float, std: float, n: int) -> str:
    """'0.812 ± 0.014 (n=3)'."""
    return f"{fmt_number(mean)} ± {fmt_number(std)} (n={n})"


def relative_header(key: str, value: str, cost_metric: str) -> str:
    return f"{cost_metric} vs {key}={value}"


def table_rows(rows: list[dict[str, Any]], metrics: Sequence[str], relative: bool) -> list[list[str]]:
    """The cells of the summary table (config, n, one per metric, relative cost)."""
    out = []
    for row in rows:
        cells = [row["config"], str(row["n"])]
        cells += [format_stat(**row["stats"][m]) for m in metrics]
        if relative:
            rel = row["relative_cost"]
            cells.append("n/a" if math.isnan(rel) else f"{rel:.2f}x")
        out.append(cells)
    return out


def to_markdown(header: Sequence[str], cells: list[list[str]], note: str | None = None) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [line(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += [line(c) for c in cells]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _csv_number(x: float | None) -> str | float:
    return "" if x is None or math.isnan(x) else x


def write_summary_csv(path: Path, rows: list[dict[str, Any]], metrics: Sequence[str],
                      relative_column: str | None = None) -> None:
    """One row per configuration: config, n, <metric>_mean, <metric>_std, <metric>_n (+ relative cost)."""
    header = ["config", "n"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
    if relative_column:
        header.append(relative_column)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values: list[Any] = [row["config"], row["n"]]
            for m in metrics:
                s = row["stats"][m]
                values += [_csv_number(s["mean"]), _csv_number(s["std"]), s["n"]]
            if relative_column:
                values.append(_csv_number(row["relative_cost"]))
            writer.writerow(values)


def write_runs_csv(path: Path, rows: list[dict[str, Any]], root: Path) -> None:
    """One row per run: config, seed, every metrics.json key (sorted), wall_time_s, run_dir."""
    runs = [(row["config"], r) for row in rows for r in row["runs"]]
    keys = sorted({k for _, r in runs for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "seed", *keys, "wall_time_s", "run_dir"])
        for config, r in runs:
            try:
                run_dir = r["path"].relative_to(root)
            except ValueError:
                run_dir = r["path"]
            writer.writerow([config, "" if r["seed"] is None else r["seed"],
                             *(_csv_number(r["metrics"].get(k)) for k in keys),
                             r["info"].get("wall_time_s", ""), run_dir.as_posix()])


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mean ± std over seeds of every configuration of a robustft sweep "
                    "(writes summary.md, summary.csv and runs.csv).",
        epilog="Example: python scripts/aggregate.py multirun/2024-05-01_12-00-00 "
               "--relative-to method=vanilla --cost-metric cost/train_flops",
    )
    parser.add_argument("sweep_dir", type=Path, help="folder searched recursively for run_info.json")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC",
                        help="metrics.json keys (default: main metric + every accuracy/f1/... key)")
    parser.add_argument("--group-by", nargs="+", metavar="KEY",
                        help="config keys to group by, e.g. method.name task.name trainer.lr "
                             "(default: the overrides of each run minus seed)")
    parser.add_argument("--out", type=Path, help="folder for summary.md/.csv and runs.csv (default: sweep_dir)")
    parser.add_argument("--relative-to", metavar="KEY=VALUE",
                        help="add the cost of each configuration relative to this one, e.g. method=vanilla")
    parser.add_argument("--cost-metric", default="cost/total_flops",
                        help="metrics.json key used by --relative-to (default: %(default)s)")
    return parser


def _split_commas(values: Sequence[str] | None) -> list[str] | None:
    return [v for value in values for v in value.split(",") if v] if values else None


def aggregate(args: argparse.Namespace) -> None:
    """Load, summarise, print and write; raises AggregateError on bad input."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    root: Path = args.sweep_dir
    if not root.is_dir():
        raise AggregateError(f"{root} is not a folder; pass the sweep folder, e.g. multirun/<timestamp>")
    all_runs = load_runs(root, include_incomplete=True)
    skipped = skipped_message(all_runs)
    runs = [r for r in all_runs if r["status"] == "completed"]
    if not all_runs:
        raise AggregateError(f"no runs (run_info.json files) under {root}; pass the folder of a sweep, "
                             "e.g. multirun/<timestamp>, or of a single run")
    if not runs:
        raise AggregateError(f"no completed runs under {root} ({skipped}); wait for the runs to finish "
                             "or rerun the failed ones")

    metrics = _split_commas(args.metrics) or default_metrics(runs)
    if not metrics:
        raise AggregateError("no metric to report; pass --metrics with keys of metrics.json")
    unknown = [m for m in metrics if not any(run_value(r, m) is not None for r in runs)]
    if unknown:
        available = sorted({k for r in runs for k in r["metrics"]})
        raise AggregateError(f"metric(s) {', '.join(unknown)} in no completed run's metrics.json; "
                             f"available: {', '.join(available) or 'none'}")
    group_by = _split_commas(args.group_by)
    rows = summarise(runs, metrics, group_by)

    header = ["config", "n", *metrics]
    relative_column = None
    if args.relative_to:
        key, value = parse_key_value(args.relative_to)
        add_relative_cost(rows, key, value, args.cost_metric)
        header.append(relative_header(key, value, args.cost_metric))
        relative_column = f"{args.cost_metric}_relative"
    cells = table_rows(rows, metrics, relative=bool(relative_column))

    console = Console(width=None if sys.stdout.isatty() else 250)  # don't wrap the table in log files
    table = Table(title=f"{root} ({len(runs)} completed runs, {len(rows)} configurations)")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
    for c in cells:
        table.add_row(*(escape(str(x)) for x in c))  # `robustness=[advglue]` is not rich markup
    console.print(table)
    for row in rows:
        if row["duplicate_seeds"]:
            console.print(f"[yellow]warning:[/] {row['config']} has several runs with seed(s) "
                          f"{', '.join(map(str, row['duplicate_seeds']))}")
    if skipped:
        console.print(skipped, highlight=False)

    out: Path = args.out or root
    out.mkdir(parents=True, exist_ok=True)
    note = f"{len(runs)} completed runs under `{root}`" + (f"; {skipped}." if skipped else ".")
    (out / "summary.md").write_text(to_markdown(header, cells, note))
    write_summary_csv(out / "summary.csv", rows, metrics, relative_column)
    write_runs_csv(out / "runs.csv", rows, root)
    console.print(f"wrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'runs.csv'}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        aggregate(args)
    except AggregateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
