"""`robustft-report RUN_OR_SWEEP_DIR ... [--out report] [--baseline vanilla]`: one scorecard of many runs.

Reads every run (a folder with run_info.json) under the given folders, leaves out runs that are not
completed (with a warning), and writes report.md, report.csv, report.tex and report.png into --out.
Bad input -> one line `robustft-report: error: <problem>; <fix>` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "robustft-report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="One scorecard of robustft runs: clean dev score, AdvGLUE, attacks and OOD sets per task, "
                    "cost, and paired statistics of each method against a baseline over shared seeds.",
        epilog="Example: robustft-report multirun/2026-01-01_10-00-00 multirun/2026-01-02_09-00-00 --out report",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR",
                        help="run or sweep folders (searched recursively for run_info.json)")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="folder for report.md/.csv/.tex/.png (default: %(default)s in the current folder)")
    parser.add_argument("--baseline", default=None,
                        help="row every method is compared with (default: vanilla, when present)")
    parser.add_argument("--keep-records", action="store_true",
                        help="also copy each completed run's records (run_info.json, metrics.json, .hydra/*.yaml; "
                             "no checkpoints) into OUT/runs/, so the report can be rebuilt and extended with "
                             "more seeds later from OUT/runs alone")
    parser.add_argument("--majority-rate", nargs="+", default=[], metavar="TASK=RATE",
                        help="majority-class rate of a task's clean split, e.g. sst2=0.5092, for runs without "
                             "predictions records: rows at that rate are not marked and the plot draws it")
    parser.add_argument("--label-by", nargs="+", default=[], metavar="KEY",
                        help="config keys added to the row label, e.g. method.upper trainer.lr "
                             "(to separate runs of one method with different options)")
    parser.add_argument("--to", choices=["mlflow", "wandb"], default=None,
                        help="also push the report as one summary run to this tracker (robustft/loggers/report.py)")
    parser.add_argument("--to-option", action="append", default=[], metavar="KEY=VALUE",
                        help="the tracker's option, e.g. tracking_uri=http://host:5000 or project=my-lab (repeatable)")
    return parser


def report(args: argparse.Namespace) -> Path:
    """Load, build, print and write; raises ReportError on bad input. Returns the output folder."""
    from robustft.report import render, tuning
    from robustft.report.collect import ReportError, load_runs
    from robustft.report.hygiene import quote, usable_runs
    from robustft.report.plots import write_forests
    from robustft.report.scorecard import build, run_warnings

    out: Path = args.out
    check_writable(out)
    majority = parse_rates(args.majority_rate)

    all_runs = []
    tuned = [p for p in args.paths if p.is_dir() and tuning.is_tuned_sweep(p)]
    for path in args.paths:
        if not path.is_dir():
            raise ReportError(f"{quote(path)} is not a folder; pass run or sweep folders (e.g. multirun/<timestamp>)")
        found = load_runs(path, include_incomplete=True)
        if path in tuned:  # a tuned sweep (hydra/sweeper=optuna): its trials are the search, final/ the results
            found = [r for r in found if "trials" not in Path(r["path"]).relative_to(path).parts[:1]]
        if not found:
            raise ReportError(f"no runs (run_info.json files) under {quote(path)}; pass the folder of a run or a sweep")
        all_runs += found
    seen, unique = set(), []
    for run in all_runs:  # overlapping arguments (a sweep and one of its runs, kept records) count once
        key = run_identity(run)
        if key not in seen:
            seen.add(key)
            unique.append(run)
    unique, unusable = usable_runs(unique)
    runs = [r for r in unique if r["status"] == "completed"]
    if not runs:
        raise ReportError(f"none of the {len(unique)} runs is completed; wait for them to finish or rerun them")
    card = build(runs, baseline=args.baseline or "vanilla", label_by=args.label_by,
                 baseline_required=args.baseline is not None, majority=majority)
    card.warnings = run_warnings(unique) + unusable + card.warnings
    title = f"robustft report: {len(runs)} runs, {len(card.labels)} methods"
    render.print_terminal(card, title)
    (out / "report.md").write_text(render.to_markdown(card, title))
    render.write_csv(card, out / "report.csv")
    (out / "report.tex").write_text(render.to_latex(card))
    render.plot(card, out / "report.png")
    forests = write_forests(card, out)
    print(f"wrote {out}/report.md, report.csv, report.tex, report.png" + "".join(f", {p.name}" for p in forests))
    if tuned:  # each arm's budget and expected-max curve, also appended to report.md
        with open(out / "report.md", "a") as f:
            f.write("\n" + tuning.write(tuned, out))
        print(f"wrote {out}/expected_max.md, expected_max.csv, expected_max.png (tuning budget per arm)")
    if args.keep_records:
        print(f"kept the records of {keep_records(runs, out / 'runs', args.label_by)} runs in {out}/runs")
    return out


def check_writable(out: Path) -> None:
    """ReportError before any output when OUT cannot be created or written (not after the table printed)."""
    import os
    import tempfile

    from robustft.report.collect import ReportError
    from robustft.report.hygiene import quote

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ReportError(f"cannot write to --out {quote(out)} ({reason}); pass a folder you can write to") from None
    if not os.access(out, os.W_OK):
        raise ReportError(f"cannot write to --out {quote(out)}; pass a folder you can write to")


def parse_rates(items: Sequence[str]) -> dict[str, float]:
    """['sst2=0.5092'] -> {'sst2': 0.5092}; ReportError for anything else."""
    from robustft.report.collect import ReportError
    from robustft.report.hygiene import quote

    out = {}
    for item in items:
        task, _, rate = item.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not task or not 0 <= value <= 1:
            raise ReportError(f"--majority-rate {quote(item)!r} is not TASK=RATE with RATE in [0, 1]; e.g. sst2=0.5092")
        out[task] = value
    return out


def run_identity(run: dict) -> str:
    """A run and its kept copy (--keep-records) are one run: the same run_info.json and metrics.json
    (run_info holds the start time, host, command line and seed of the run)."""
    import json

    return json.dumps([run["info"], run["metrics"]], sort_keys=True, default=str)


RECORDS = ("run_info.json", "metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml")
RECORD_GLOBS = ("predictions/*.jsonl", "eval/*/samples.jsonl")  # per-example records (statistics, intersection)


def keep_records(runs: list[dict], dest: Path, label_by: Sequence[str]) -> int:
    """Copy the small record files of `runs` to dest/<label>/<task>/seed<seed>/.

    Those four files and the per-example records (predictions/*.jsonl, eval/*/samples.jsonl) are all
    the report reads, so a report folder with its runs/ rebuilds itself:
    `robustft-report OUT/runs NEW_SWEEP --out OUT --keep-records` adds seeds run in a later session.
    """
    import re
    import shutil

    from robustft.report.collect import lookup
    from robustft.report.scorecard import run_label

    for run in runs:
        parts = [run_label(run, label_by), str(lookup(run, "task.name")), f"seed{run['seed']}"]
        target = dest.joinpath(*(re.sub(r"[^A-Za-z0-9_.=+-]+", "_", p).strip("_") for p in parts))
        if target.resolve() == Path(run["path"]).resolve():
            continue
        names = [*RECORDS, *(str(p.relative_to(run["path"])) for g in RECORD_GLOBS for p in Path(run["path"]).glob(g))]
        for name in names:
            src = Path(run["path"]) / name
            if src.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target / name)
    return len(runs)


def main(argv: Sequence[str] | None = None) -> int:
    from robustft.report.collect import ReportError

    args = build_parser().parse_args(argv)
    from robustft.errors import UserError

    try:
        if args.to:  # a wrong option or a missing package: before any work
            from robustft.loggers.report import check, push

            check(args.to, args.to_option)
        out = report(args)
        if args.to:  # pushed after writing: the folder is the record either way
            print(f"pushed to {push(out, args.to, args.to_option)}")
    except (ReportError, UserError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
