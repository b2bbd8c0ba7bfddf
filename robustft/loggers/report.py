"""`robustft-report ... --to mlflow|wandb`: a written report folder pushed to a tracker as one summary run.

The files robustft-report wrote (report.md, report.csv, report.tex, every *.png) become the run's artifacts /
files; report.csv (long format: one row per method and column) becomes a table (MLflow `log_table`, a W&B
`Table`) and each row's mean a metric `<method>/<column>` (characters a tracker refuses in a key become `_`).
`--to-option KEY=VALUE` passes the tracker's own options: mlflow `tracking_uri` (default: sqlite:///<out>/mlflow.db),
`experiment_name` (robustft-report), `run_name` (the folder's name); wandb `project` (robustft), `entity`,
`mode` (offline: files in <out>/wandb), `run_name`, `tags` (comma-separated).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path
from typing import Any

from robustft.errors import UserError
from robustft.loggers.base import EXTRA

FILES = ("*.md", "*.csv", "*.tex", "*.png")
OPTIONS = {"mlflow": {"tracking_uri", "experiment_name", "run_name"},
           "wandb": {"project", "entity", "mode", "run_name", "tags"}}


def parse_options(to: str, items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS[to]:
            raise UserError(f"--to-option {item!r} is not an option of --to {to}; use KEY=VALUE with KEY one of "
                            f"{', '.join(sorted(OPTIONS[to]))}")
        out[key] = value
    return out


def read_table(out: Path) -> tuple[list[str], list[list[str]]]:
    path = out / "report.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def means(header: list[str], rows: list[list[str]]) -> dict[str, float]:
    """`<method>/<column>` -> mean of every report.csv row that has one."""
    if not {"method", "column", "mean"} <= set(header):
        return {}
    i, j, k = header.index("method"), header.index("column"), header.index("mean")
    out = {}
    for row in rows:
        try:
            value = float(row[k])
        except ValueError:
            continue
        out[re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"{row[i]}/{row[j]}")] = value
    return out


def check(to: str, option_items: list[str]) -> dict[str, str]:
    """The options, checked with the package's presence before the report is built (a one-line error)."""
    if to not in OPTIONS:
        raise UserError(f"--to {to} is not a tracker; use --to mlflow or --to wandb")
    options = parse_options(to, option_items)
    if importlib.util.find_spec(to) is None:
        raise UserError(f"--to {to} needs the {to} package, which is not installed; {EXTRA}")
    return options


def push(out: Path, to: str, option_items: list[str]) -> str:
    """Push the report folder `out` to `to`; returns where the run is (printed by robustft-report)."""
    options = check(to, option_items)
    files = sorted({p for pattern in FILES for p in out.glob(pattern) if p.is_file()})
    header, rows = read_table(out)
    return (_mlflow if to == "mlflow" else _wandb)(out, options, files, header, rows)


def _mlflow(out: Path, options: dict[str, str], files: list[Path], header: list[str], rows: list[list[str]]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = options.get("tracking_uri") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    name = options.get("experiment_name", "robustft-report")
    found = client.get_experiment_by_name(name)
    artifacts = None if options.get("tracking_uri") else (out.resolve() / "mlartifacts").as_uri()
    experiment = found.experiment_id if found else client.create_experiment(name, artifact_location=artifacts)
    run = client.create_run(experiment, run_name=options.get("run_name", out.resolve().name),
                            tags={"kind": "robustft-report", "report_dir": str(out.resolve())})
    run_id = run.info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path))
        if header:
            client.log_table(run_id, {h: [r[c] if c < len(r) else "" for r in rows] for c, h in enumerate(header)},
                             "report_table.json")
        metrics = [Metric(k, v, 0, 0) for k, v in means(header, rows).items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return f"MLflow run {run_id} in experiment {name} at {uri}"


def _wandb(out: Path, options: dict[str, str], files: list[Path], header: list[str], rows: list[list[str]]) -> str:
    import wandb

    run: Any = wandb.init(project=options.get("project", "robustft"), entity=options.get("entity"),
                          mode=options.get("mode", "offline"), dir=str(out.resolve()), job_type="report",
                          name=options.get("run_name", out.resolve().name),
                          tags=[t for t in options.get("tags", "").split(",") if t], reinit="create_new",
                          settings=wandb.Settings(console="off", quiet=True, silent=True))
    try:
        logged: dict[str, Any] = {f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        if header:
            logged["report"] = wandb.Table(columns=header, data=[r + [""] * (len(header) - len(r)) for r in rows])
        run.log(logged)
        run.summary.update(means(header, rows))
        for path in files:
            run.save(str(path.resolve()), base_path=str(out.resolve()), policy="now")
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish(exit_code=0)
    return f"W&B run {run.id} (project {options.get('project', 'robustft')}, mode {options.get('mode', 'offline')})"
