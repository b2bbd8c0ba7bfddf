"""`robustft-report --to mlflow|wandb` (issue 30, item 5): a report pushed as one summary run, read back with
MlflowClient and wandb's own records (tests/tracker_readers.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from robustft.report.cli import main
from tests.tracker_readers import wandb_records

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mlflow", "wandb")),
                                reason="pip install -e '.[loggers]' (mlflow, wandb)")


def sweep(root: Path) -> Path:
    """Two methods x three seeds of run records, as robustft writes them (what robustft-report reads)."""
    for method, clean in (("vanilla", 0.80), ("rose", 0.78)):
        for seed in (1, 2, 3):
            path = root / f"method={method}" / f"seed={seed}"
            (path / ".hydra").mkdir(parents=True)
            config = {"seed": seed, "task": {"name": "sst2"}, "method": {"name": method}, "selector": {"name": "none"},
                      "model": {"name": "minilm"}, "trainer": {"lr": 1e-4}}
            (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
            (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", f"seed={seed}"]))
            info = {"status": "completed", "seed": seed, "task": "sst2", "method": method, "model": "minilm",
                    "main_metric": "validation/accuracy", "git_sha": "abc123"}
            (path / "run_info.json").write_text(json.dumps(info))
            score = clean + 0.01 * seed
            (path / "metrics.json").write_text(json.dumps({"validation/accuracy": score, "advglue/accuracy": score - 0.4,
                                                           "cost/total_flops": 1e12, "cost/train_flops": 1e12}))
    return root


@pytest.mark.slow  # a new MLflow store and a W&B run: 90 s on 2 cores at load 17 (other jobs)
def test_report_pushed_to_mlflow_and_wandb(tmp_path, capsys):
    from mlflow import MlflowClient

    runs, out = sweep(tmp_path / "multirun"), tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--to", "mlflow", "--to-option", "run_name=sst2 scorecard"]) == 0
    assert "pushed to MLflow run" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("robustft-report")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "sst2 scorecard"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.csv", "report.tex", "report.png", "report_table.json"} <= names
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["mean"])
    assert run.data.metrics[f"{row['method']}/{row['column']}"] == pytest.approx(float(row["mean"]))

    assert main([str(runs), "--out", str(out), "--to", "wandb"]) == 0
    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in wandb_records(path)]
    history = [r for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]
    keys = {i.key or i.nested_key[0] for r in history for i in r.history.item}  # an image/table: [name, field]
    assert {"report", "plots/report"} <= keys and "exit" in kinds
    saved = {f.path for r in wandb_records(path) if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"report.md", "report.csv", "report.tex", "report.png"} <= saved


def test_report_push_mistakes_are_one_line_errors_before_any_work(tmp_path, capsys):
    runs, out = sweep(tmp_path / "multirun"), tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--to", "mlflow", "--to-option", "project=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--to-option 'project=x' is not an option of --to mlflow" in err
    assert not out.exists()
