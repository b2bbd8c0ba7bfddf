"""Tests of scripts/aggregate.py and scripts/plot.py on fake sweep folders (no training involved)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import aggregate  # noqa: E402

# (task, method, seed) -> validation/accuracy; other metrics are derived from it.
ACC = {
    ("rte", "vanilla", 1): 0.70, ("rte", "vanilla", 2): 0.72, ("rte", "vanilla", 3): 0.75,
    ("rte", "ftft", 1): 0.74, ("rte", "ftft", 2): 0.71, ("rte", "ftft", 3): 0.78,
    ("sst2", "vanilla", 1): 0.91, ("sst2", "vanilla", 2): 0.93,
    ("sst2", "ftft", 1): 0.92, ("sst2", "ftft", 2): 0.95,
}
FLOPS = {("rte", "vanilla"): 1.0e14, ("rte", "ftft"): 0.4e14, ("sst2", "vanilla"): 5.0e14, ("sst2", "ftft"): 2.5e14}


def write_run(path: Path, *, task: str, method: str, seed: int, overrides: list[str],
              metrics: dict[str, float] | None, status: str = "completed", lr: float = 2e-5,
              curve: list[dict[str, Any]] | None = None) -> Path:
    """One run folder in the format robustft writes."""
    (path / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "tag": None, "data_dir": "/data", "task": {"name": task, "is_regression": False},
              "method": {"_target_": f"robustft.methods.{method}.X", "name": method},
              "model": {"name": "minilm"}, "trainer": {"lr": lr, "epochs": 3}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN"}}))
    info = {"status": status, "seed": seed, "task": task, "method": method, "model": "minilm", "tag": None,
            "main_metric": "validation/accuracy", "wall_time_s": 60.0 + seed}
    (path / "run_info.json").write_text(json.dumps(info))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if curve is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
    return path


def fake_metrics(task: str, method: str, seed: int) -> dict[str, float]:
    acc = ACC[task, method, seed]
    return {
        "validation/accuracy": acc, "validation/loss": 1 - acc, "validation/examples_per_s": 900.0,
        "train/examples_per_s": 120.0, "train/wall_s": 50.2, "cost/train_flops": FLOPS[task, method],
        "advglue/overall": acc / 2, "advglue/sst2_accuracy": acc / 3,
    }


def fake_curve(acc: float) -> list[dict[str, Any]]:
    rows = []
    for step in (10, 20, 30):
        rows.append({"step": step, "epoch": 0, "split": "train", "loss": 1.0 / step, "lr": 1e-5})
        rows.append({"step": step, "epoch": 0, "split": "validation", "accuracy": acc * step / 30})
    return rows


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """multirun/<ts>/<override_dirname>/seed=<seed>/ with 2 tasks x 2 methods, a 1-seed lr config, 2 failures."""
    root = tmp_path / "multirun" / "2024-05-01_12-00-00"
    for (task, method, seed) in ACC:
        overrides = [f"seed={seed}", f"method={method}", f"task={task}", "data_dir=/data", "hydra/launcher=slurm"]
        write_run(root / f"method={method},task={task}" / f"seed={seed}", task=task, method=method, seed=seed,
                  overrides=overrides, metrics=fake_metrics(task, method, seed), curve=fake_curve(ACC[task, method, seed]))
    # A configuration with a single seed (std undefined) and an extra method parameter.
    write_run(root / "method=ftft,method.ratio=0.5,task=rte" / "seed=1", task="rte", method="ftft", seed=1,
              overrides=["seed=1", "method=ftft", "+method.ratio=0.5", "task=rte"],
              metrics={**fake_metrics("rte", "ftft", 1), "validation/accuracy": 0.6, "cost/train_flops": 0.2e14})
    # Runs that must be skipped, although some have metrics.
    write_run(root / "method=vanilla,task=rte" / "seed=4", task="rte", method="vanilla", seed=4,
              overrides=["seed=4", "method=vanilla", "task=rte"], metrics={"validation/accuracy": 0.0},
              status="failed")
    write_run(root / "method=vanilla,task=rte" / "seed=5", task="rte", method="vanilla", seed=5,
              overrides=["seed=5", "method=vanilla", "task=rte"], metrics=None, status="running")
    return root


def stats(task: str, method: str) -> tuple[float, float]:
    values = [v for (t, m, _), v in ACC.items() if (t, m) == (task, method)]
    return float(np.mean(values)), float(np.std(values, ddof=1))


def by_config(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["config"]: row for row in rows}


def run_script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=60)


# ----------------------------------------------------------------------------------------------- functions


def test_load_runs_skips_incomplete(sweep: Path) -> None:
    runs = aggregate.load_runs(sweep)
    assert len(runs) == len(ACC) + 1 and all(r["status"] == "completed" for r in runs)
    everything = aggregate.load_runs(sweep, include_incomplete=True)
    assert len(everything) == len(ACC) + 3
    assert aggregate.skipped_message(everything) == "skipped 2 runs: 1 failed, 1 running"
    assert aggregate.skipped_message(runs) is None


def test_default_metrics(sweep: Path) -> None:
    metrics = aggregate.default_metrics(aggregate.load_runs(sweep))
    assert metrics == ["validation/accuracy", "advglue/overall", "advglue/sst2_accuracy"]


def test_summarise_by_overrides_matches_numpy(sweep: Path) -> None:
    runs = aggregate.load_runs(sweep)
    rows = by_config(aggregate.summarise(runs, ["validation/accuracy", "advglue/overall"]))
    # seed, data_dir and hydra/launcher are not part of the configuration; `+` prefixes are dropped.
    assert sorted(rows) == sorted([
        "method=ftft,task=rte", "method=ftft,task=sst2", "method=vanilla,task=rte", "method=vanilla,task=sst2",
        "method=ftft,method.ratio=0.5,task=rte",
    ])
    for task in ("rte", "sst2"):
        for method in ("vanilla", "ftft"):
            row = rows[f"method={method},task={task}"]
            mean, std = stats(task, method)
            acc = row["stats"]["validation/accuracy"]
            assert acc["mean"] == pytest.approx(mean, abs=1e-12)
            assert acc["std"] == pytest.approx(std, abs=1e-12)
            assert acc["n"] == row["n"] == (3 if task == "rte" else 2)
            assert row["stats"]["advglue/overall"]["mean"] == pytest.approx(mean / 2, abs=1e-12)
            assert sorted(row["seeds"]) == ([1, 2, 3] if task == "rte" else [1, 2])
    single = rows["method=ftft,method.ratio=0.5,task=rte"]["stats"]["validation/accuracy"]
    assert single["n"] == 1 and single["mean"] == 0.6 and math.isnan(single["std"])
    assert aggregate.format_stat(**single) == "0.600 ± n/a (n=1)"


def test_wall_time_comes_from_run_info(sweep: Path) -> None:
    """`--metrics wall_time_s`: each run's whole wall time (run_info.json: 60 + seed here), which metrics.json
    lacks; the defence report's minutes per run come from it."""
    rows = by_config(aggregate.summarise(aggregate.load_runs(sweep), ["wall_time_s"]))
    wall = rows["method=vanilla,task=rte"]["stats"]["wall_time_s"]
    assert (wall["mean"], wall["n"]) == (62.0, 3) and wall["std"] == pytest.approx(1.0)


def test_summarise_group_by_config_keys(sweep: Path) -> None:
    runs = aggregate.load_runs(sweep)
    rows = by_config(aggregate.summarise(runs, ["validation/accuracy"], ["method.name"]))
    assert sorted(rows) == ["method.name=ftft", "method.name=vanilla"]
    vanilla = [v for (_, m, _), v in ACC.items() if m == "vanilla"]
    assert rows["method.name=vanilla"]["stats"]["validation/accuracy"]["mean"] == pytest.approx(np.mean(vanilla))
    assert rows["method.name=vanilla"]["stats"]["validation/accuracy"]["std"] == pytest.approx(
        np.std(vanilla, ddof=1))
    assert rows["method.name=ftft"]["n"] == 6  # 5 ftft seeds + the single ratio=0.5 run
    # A config group stands for its name; trainer.lr groups numerically.
    rows = by_config(aggregate.summarise(runs, ["validation/accuracy"], ["method", "task"]))
    assert rows["method=vanilla,task=rte"]["n"] == 3
    assert list(by_config(aggregate.summarise(runs, ["validation/accuracy"], ["trainer.lr"]))) == ["trainer.lr=2e-05"]
    with pytest.raises(aggregate.AggregateError, match="trainer.nope"):
        aggregate.summarise(runs, ["validation/accuracy"], ["trainer.nope"])


def test_relative_cost(sweep: Path) -> None:
    runs = aggregate.load_runs(sweep)
    rows = aggregate.summarise(runs, ["validation/accuracy"])
    aggregate.add_relative_cost(rows, "method", "vanilla", "cost/train_flops")
    rel = {r["config"]: r["relative_cost"] for r in rows}
    assert rel["method=vanilla,task=rte"] == pytest.approx(1.0)
    assert rel["method=ftft,task=rte"] == pytest.approx(0.4)
    assert rel["method=ftft,task=sst2"] == pytest.approx(0.5)  # compared with vanilla on sst2, not rte
    assert rel["method=ftft,method.ratio=0.5,task=rte"] == pytest.approx(0.2)
    # With --group-by the same key works as `method` or `method.name`.
    rows = aggregate.summarise(runs, ["validation/accuracy"], ["method.name", "task.name"])
    aggregate.add_relative_cost(rows, "method", "vanilla", "cost/train_flops")
    rel = {r["config"]: r["relative_cost"] for r in rows}
    assert rel["method.name=ftft,task.name=rte"] == pytest.approx(np.mean([0.4e14] * 3 + [0.2e14]) / 1e14)
    with pytest.raises(aggregate.AggregateError, match="method=bitfit"):
        aggregate.add_relative_cost(rows, "method", "bitfit", "cost/train_flops")


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_tables(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_script(SCRIPTS / "aggregate.py", sweep, "--metrics", "validation/accuracy", "advglue/overall",
                      "--out", out, "--relative-to", "method=vanilla", "--cost-metric", "cost/train_flops",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 runs: 1 failed, 1 running" in proc.stdout
    mean, std = stats("rte", "vanilla")
    cell = f"{mean:.3f} ± {std:.3f} (n=3)"
    assert cell in proc.stdout

    with open(out / "summary.csv", newline="") as f:
        table = {row["config"]: row for row in csv.DictReader(f)}
    assert len(table) == 5
    row = table["method=vanilla,task=rte"]
    assert row["n"] == "3"
    assert float(row["validation/accuracy_mean"]) == pytest.approx(mean, abs=1e-12)
    assert float(row["validation/accuracy_std"]) == pytest.approx(std, abs=1e-12)
    assert float(table["method=ftft,task=sst2"]["cost/train_flops_relative"]) == pytest.approx(0.5)
    assert table["method=ftft,method.ratio=0.5,task=rte"]["validation/accuracy_std"] == ""

    md = (out / "summary.md").read_text()
    assert md.startswith("| config | n | validation/accuracy | advglue/overall | cost/train_flops vs method=vanilla |")
    assert f"| method=vanilla,task=rte | 3 | {cell} |" in md
    assert "0.40x" in md and "skipped 2 runs" in md

    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(ACC) + 1  # completed runs only
    assert {"config", "seed", "validation/accuracy", "validation/loss", "cost/train_flops", "run_dir"} <= set(runs[0])
    accs = sorted(float(r["validation/accuracy"]) for r in runs if r["config"] == "method=ftft,task=rte")
    assert accs == sorted(v for (t, m, _), v in ACC.items() if (t, m) == ("rte", "ftft"))


def test_cli_default_out_and_group_by(sweep: Path) -> None:
    assert aggregate.main([str(sweep), "--group-by", "task.name"]) == 0  # in-process: faster than a subprocess
    with open(sweep / "summary.csv", newline="") as f:
        table = {row["config"]: row for row in csv.DictReader(f)}
    assert sorted(table) == ["task.name=rte", "task.name=sst2"]
    assert "advglue/sst2_accuracy_mean" in table["task.name=rte"]  # default metrics
    assert "validation/loss_mean" not in table["task.name=rte"]
    assert (sweep / "summary.md").is_file() and (sweep / "runs.csv").is_file()


def test_cli_errors(tmp_path: Path, sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(SCRIPTS / "aggregate.py", empty, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aggregate.py: error: no runs")
    capsys.readouterr()
    assert aggregate.main([str(sweep), "--metrics", "validation/acc"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("aggregate.py: error: metric(s) validation/acc") and "validation/accuracy" in err
    assert aggregate.main([str(sweep), "--relative-to", "method"]) != 0
    assert "KEY=VALUE" in capsys.readouterr().err
    only_failed = tmp_path / "only_failed"
    write_run(only_failed / "a", task="rte", method="vanilla", seed=1, overrides=["seed=1"], metrics=None,
              status="failed")
    assert aggregate.main([str(only_failed)]) != 0
    assert "no completed runs" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- plot


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bars_and_curves(sweep: Path, tmp_path: Path) -> None:
    bars = tmp_path / "bars.png"
    proc = run_script(SCRIPTS / "plot.py", sweep, "--metric", "validation/accuracy", "--x", "method.name",
                      "--hue", "task.name", "--out", bars, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert is_png(bars)
    import plot

    curve = tmp_path / "curve.png"
    assert plot.main([str(sweep), "--curve", "validation/accuracy", "--out", str(curve)]) == 0
    assert is_png(curve)


def test_plot_functions(sweep: Path, tmp_path: Path) -> None:
    import plot

    runs = aggregate.load_runs(sweep)
    assert is_png(plot.plot_bars(runs, "validation/accuracy", tmp_path / "a.png"))
    assert is_png(plot.plot_curves(runs, "train/loss", tmp_path / "b.png", x="method.name"))
    curves = [plot.read_curve(r["path"], "validation/accuracy") for r in runs if r["path"].match("*task=rte/*")]
    steps, mean, std = plot.mean_std_curve([c for c in curves if c])
    assert list(steps) == [10, 20, 30]
    last = [c[30] for c in curves if c]
    assert mean[-1] == pytest.approx(np.mean(last)) and std[-1] == pytest.approx(np.std(last, ddof=1))
    with pytest.raises(aggregate.AggregateError, match="available: .*train/loss"):
        plot.plot_curves(runs, "validation/f1", tmp_path / "c.png")
