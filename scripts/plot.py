#!/usr/bin/env python
"""Plot a robustft sweep: bar chart of final metrics, or training curves from metrics.jsonl.

Examples::

    # mean ± std (error bars) of a metrics.json key per configuration
    python scripts/plot.py multirun/2024-05-01_12-00-00 --metric validation/accuracy
    python scripts/plot.py multirun/... --metric validation/accuracy --x method.name --hue task.name

    # a metrics.jsonl curve against step: mean line and ± std band over seeds per configuration
    python scripts/plot.py multirun/... --curve validation/accuracy
    python scripts/plot.py multirun/... --curve train/loss --x method.name --out loss.png

Runs are loaded with aggregate.py's loader (completed runs only). Configurations are the runs'
overrides minus seed, as in aggregate.py, or the values of the config keys given with --x/--hue.
A curve name is `split/key`: `validation/accuracy` reads the `accuracy` field of the rows of
metrics.jsonl whose `split` is `validation`. When a run logged a step twice (it was resumed from a
checkpoint), its last row for that step is used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aggregate  # noqa: E402
from aggregate import AggregateError  # noqa: E402

PROG = "plot.py"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _group_by(x: str | None, hue: str | None) -> list[str] | None:
    if hue and not x:
        raise AggregateError("--hue needs --x, e.g. --x method.name --hue task.name")
    return [k for k in (x, hue) if k] or None


# ------------------------------------------------------------------------------------------------- bars


def plot_bars(runs: list[dict[str, Any]], metric: str, out: Path, x: str | None = None,
              hue: str | None = None, title: str | None = None) -> Path:
    """Bar per configuration (or per --x value, grouped by --hue) of the mean, std as error bar."""
    if not any(metric in r["metrics"] for r in runs):
        available = sorted({k for r in runs for k in r["metrics"]})
        raise AggregateError(f"metric {metric!r} is in no completed run's metrics.json; "
                             f"available: {', '.join(available) or 'none'}")
    rows = aggregate.summarise(runs, [metric], _group_by(x, hue))
    rows = [r for r in rows if r["stats"][metric]["n"]]

    def x_of(row: dict[str, Any]) -> str:
        return row["items"][0][1] if x else row["config"]

    def hue_of(row: dict[str, Any]) -> str | None:
        return row["items"][1][1] if hue else None

    xs = list(dict.fromkeys(x_of(r) for r in rows))
    hues = list(dict.fromkeys(hue_of(r) for r in rows))
    width = 0.8 / len(hues)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.9 * len(xs) * max(1, len(hues) / 2)), 4.5))
    for j, h in enumerate(hues):
        chosen = [r for r in rows if hue_of(r) == h]
        pos = [xs.index(x_of(r)) + (j - (len(hues) - 1) / 2) * width for r in chosen]
        means = [r["stats"][metric]["mean"] for r in chosen]
        stds = [r["stats"][metric]["std"] for r in chosen]
        stds = [0.0 if math.isnan(s) else s for s in stds]
        bars = ax.bar(pos, means, width * 0.95, yerr=stds, capsize=3, label=h)
        ax.bar_label(bars, labels=[f"{aggregate.fmt_number(m)}\nn={r['stats'][metric]['n']}"
                                   for m, r in zip(means, chosen, strict=True)], fontsize=7, padding=2)
    long_labels = max(map(len, xs)) > 12
    ax.set_xticks(range(len(xs)), xs, rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_ylabel(metric)
    ax.set_xlabel(x or "configuration")
    ax.set_title(title or f"{metric} (mean ± std over seeds)", fontsize=10)
    ax.margins(y=0.15)
    if hue:
        ax.legend(title=hue, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------- curves


def read_curve(run_dir: Path, name: str) -> dict[int, float]:
    """{step: value} of curve `split/key` from a run's metrics.jsonl (last row wins for repeated steps)."""
    split, _, key = name.partition("/")
    points: dict[int, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return points
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        if key and row.get("split") == split and key in row:
            value = row[key]
        elif row.get("split") is None and name in row:
            value = row[name]
        else:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            points[int(row["step"])] = float(value)
    return points


def curve_names(run_dir: Path) -> set[str]:
    """Every `split/key` curve of a run's metrics.jsonl (for error messages)."""
    names: set[str] = set()
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            names |= {f"{row['split']}/{k}" if row.get("split") else k
                      for k, v in row.items() if k not in ("step", "epoch", "split") and isinstance(v, int | float)}
    return names


def mean_std_curve(curves: Sequence[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and std (ddof=1, 0 where only one run has the step) over the runs having each step."""
    steps = sorted({s for c in curves for s in c})
    means, stds = [], []
    for step in steps:
        values = [c[step] for c in curves if step in c]
        mean, std = aggregate.mean_std(values)
        means.append(mean)
        stds.append(0.0 if math.isnan(std) else std)
    return np.asarray(steps), np.asarray(means), np.asarray(stds)


def plot_curves(runs: list[dict[str, Any]], name: str, out: Path, x: str | None = None,
                hue: str | None = None, title: str | None = None) -> Path:
    """One line per configuration: mean over seeds of curve `name` against step, ± std band."""
    groups = aggregate.group_runs(runs, _group_by(x, hue))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for items, group in groups.items():
        curves = [c for c in (read_curve(r["path"], name) for r in group) if c]
        if not curves:
            continue
        steps, mean, std = mean_std_curve(curves)
        (line,) = ax.plot(steps, mean, marker="o" if len(steps) < 20 else None, markersize=3,
                          label=f"{aggregate.config_label(items)} (n={len(curves)})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        plotted += 1
    if not plotted:
        plt.close(fig)
        available = sorted(set().union(*(curve_names(r["path"]) for r in runs)))
        raise AggregateError(f"curve {name!r} is in no completed run's metrics.jsonl; "
                             f"available: {', '.join(available) or 'none'}")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(title or f"{name} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("sweep_dir", type=Path, help="folder searched recursively for run_info.json")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--metric", help="metrics.json key to plot as bars, e.g. validation/accuracy")
    mode.add_argument("--curve", metavar="METRIC", help="metrics.jsonl curve to plot against step, e.g. train/loss")
    parser.add_argument("--x", help="config key on the x axis / to group by, e.g. method.name "
                                    "(default: one bar or line per configuration)")
    parser.add_argument("--hue", help="second config key, e.g. task.name (needs --x)")
    parser.add_argument("--out", type=Path, help="PNG file (default: <sweep_dir>/<metric>.png)")
    parser.add_argument("--title", help="plot title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root: Path = args.sweep_dir
        if not root.is_dir():
            raise AggregateError(f"{root} is not a folder; pass the sweep folder, e.g. multirun/<timestamp>")
        all_runs = aggregate.load_runs(root, include_incomplete=True)
        runs = [r for r in all_runs if r["status"] == "completed"]
        skipped = aggregate.skipped_message(all_runs)
        if not runs:
            raise AggregateError(f"no completed runs (run_info.json) under {root}"
                                 + (f" ({skipped})" if skipped else "") + "; pass the folder of a sweep")
        name = args.curve or args.metric
        out: Path = args.out or root / f"{'curve_' if args.curve else ''}{_slug(name)}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        plot = plot_curves if args.curve else plot_bars
        plot(runs, name, out, x=args.x, hue=args.hue, title=args.title)
    except AggregateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if skipped:
        print(skipped)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
