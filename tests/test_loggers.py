"""`logger=[...]` (issue 30): what each tracker received, read back with its own library's reader.

Runs go through the console script in-process (`cli.main` with a patched argv) on a tiny random model, so
the trackers see exactly what a user's run sends; tests/tracker_readers.py has the readers.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from robustft.loggers.base import RunMeta, Tracker, Trackers
from tests import test_bad_inputs as bad_inputs
from tests.conftest import needs_data
from tests.test_bad_inputs import isolated_process_state  # noqa: F401  (autouse: cli.main's process state put back)
from tests.tracker_readers import tensorboard_scalars, wandb_run

# the real-run tests need the `loggers` extra (.ci/run installs it)
needs_trackers = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("tensorboard", "mlflow", "wandb")),
                                    reason="pip install -e '.[loggers]' (tensorboard, mlflow, wandb)")

TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=64", "task.max_eval_samples=32",
        "trainer.epochs=2", "trainer.batch_size=8", "trainer.eval_every=4", "trainer.log_every=2",
        "trainer.save_every=3", "trainer.precision=fp32", "trainer.max_length=32"]


def robustft(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `robustft <args>` in-process on this file's tiny set-up; (exit code, stderr)."""
    return bad_inputs.robustft(monkeypatch, capsys, *args, tiny=TINY)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def mlflow_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# ---------------------------------------------------------------- the fan-out, without a library


class Recorder(Tracker):
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.closed: list[str] = []

    def open(self, meta, folder, state):
        return {"id": "r1"}

    def log_rows(self, rows):
        self.rows += rows

    def log_final(self, metrics):
        pass

    def close(self, status, tags):
        self.closed.append(status)


def test_trackers_skip_rows_they_have_and_back_fill_rows_a_killed_process_never_sent(tmp_path):
    file_rows = [{"step": i, "split": "train", "loss": float(i)} for i in range(1, 7)]
    saved: list[dict] = []
    rec = Recorder()
    meta = RunMeta("g/seed=1", "g", "robustft", 1, tmp_path, tmp_path, {})
    t = Trackers({"r": rec}, meta, {"rows": 2}, lambda a, b: file_rows[a:b], lambda s: saved.append(dict(s)),
                 fresh=False, flush_rows=100)
    t.open(lambda name: tmp_path / name)
    t.log(file_rows[0], 0)  # a resumed run logs again rows 0 and 1 (after its checkpoint): the tracker has them
    t.log(file_rows[1], 1)
    assert t.buffer == []
    t.log(file_rows[4], 4)  # rows 2, 3 are in metrics.jsonl but were never sent (the process was killed)
    t.close("completed", {"git_sha": "abc"}, rows=6)  # row 5: written, not yet logged through log()
    assert [step for step, _ in rec.rows] == [3, 4, 5, 6]
    assert rec.rows[0][1] == {"train/loss": 3.0} and rec.closed == ["completed"]
    assert saved[-1] == {"rows": 6, "r": {"id": "r1"}, "run": {"name": "g/seed=1", "group": "g"}}


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_run_goes_on(tmp_path, caplog):
    class Broken(Recorder):
        def log_rows(self, rows):
            raise ConnectionError("server gone")

    good, meta = Recorder(), RunMeta("g/seed=1", "g", "robustft", 1, tmp_path, tmp_path, {})
    t = Trackers({"broken": Broken(), "good": good}, meta, {"rows": 0}, lambda a, b: [], lambda s: None, flush_rows=1)
    t.open(lambda name: tmp_path / name)
    t.log({"step": 1, "split": "train", "loss": 1.0}, 0)
    t.log({"step": 2, "split": "train", "loss": 2.0}, 1)
    t.close("completed", {}, rows=2)
    assert [s for s, _ in good.rows] == [1, 2] and good.closed == ["completed"]
    assert "logger=broken failed (ConnectionError: server gone)" in caplog.text


# ---------------------------------------------------------------- real runs


@needs_data()
def test_logger_mistakes_are_one_line_errors(monkeypatch, capsys, tmp_path):
    code, err = robustft(monkeypatch, capsys, "logger=[tensorboard]", "+logger.tensorboard.logdir=x",
                         f"hydra.run.dir={tmp_path / 'a'}")
    assert code == 2 and err.count("\n") == 1, err
    assert "unknown option 'logger.tensorboard.logdir'" in err and "log_dir" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, err = robustft(monkeypatch, capsys, "logger=[csv,wandb]", f"hydra.run.dir={tmp_path / 'b'}")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("robustft: error: logger=wandb needs the wandb package") and "pip install -e '.[loggers]'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # the pre-flight stopped both


@needs_trackers
@needs_data()
def test_interrupted_then_resumed_run_is_one_tracker_run_without_duplicate_steps(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    args = ["logger=[csv,tensorboard,mlflow]", f"hydra.run.dir={run}"]
    code, err = robustft(monkeypatch, capsys, *args, "+trainer.interrupt_at_step=5")
    assert code == 3, err
    uri = f"sqlite:///{run / 'mlflow.db'}"
    (first,) = mlflow_runs(uri)
    assert first.info.status == "KILLED" and first.data.tags["status"] == "interrupted"

    code, err = robustft(monkeypatch, capsys, *args)  # the same command resumes
    assert code == 0, err
    rows, final = jsonl(run / "metrics.jsonl"), json.loads((run / "metrics.json").read_text())
    train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    val = [(r["step"], r["accuracy"]) for r in rows if r["split"] == "validation"]
    assert [s for s, _ in train] == list(range(2, 17, 2)) and [s for s, _ in val] == [4, 8, 12, 16]

    scalars = tensorboard_scalars(run / "tensorboard")  # every scalar once, at its step, across both attempts
    assert [(s, pytest.approx(v)) for s, v in scalars["train/loss"]] == train
    assert [(s, pytest.approx(v)) for s, v in scalars["validation/accuracy"]] == val

    from mlflow import MlflowClient

    (mrun,) = mlflow_runs(uri)  # one MLflow run: the resumed attempt reopened it
    assert mrun.info.run_id == first.info.run_id and mrun.info.status == "FINISHED"
    assert mrun.data.tags["group"] == first.data.tags["group"] and mrun.info.run_name == first.info.run_name
    history = MlflowClient(tracking_uri=uri).get_metric_history(mrun.info.run_id, "train/loss")
    assert sorted((m.step, pytest.approx(m.value)) for m in history) == train
    assert mrun.data.metrics["final/validation/accuracy"] == pytest.approx(final["validation/accuracy"])
    assert mrun.data.metrics["final/cost/train_flops"] == pytest.approx(final["cost/train_flops"])
    assert mrun.data.params["trainer.lr"] == "0.0001" or float(mrun.data.params["trainer.lr"]) > 0
    assert mrun.data.params["model.name"] == "tiny_random" and mrun.data.params["seed"] == "42"
    info = json.loads((run / "run_info.json").read_text())
    assert mrun.data.tags["status"] == "completed" and mrun.data.tags["git_sha"] == str(info["git_sha"])
    assert mrun.data.tags["run_dir"] == str(run.resolve())

    with open(run / "csv" / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows]


@pytest.mark.slow  # two runs, each opening MLflow's SQLite store and a W&B run: 30-50 s on 2 shared cores
@needs_trackers
@needs_data()
def test_two_seed_sweep_gives_two_runs_in_one_group(monkeypatch, capsys, tmp_path):
    sweep = tmp_path / "sweep"
    code, err = robustft(monkeypatch, capsys, "-m", "seed=1,2", "trainer.lr=1e-3", "logger=[tensorboard,mlflow,wandb]",
                         f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    runs = mlflow_runs(f"sqlite:///{sweep / 'mlflow.db'}")  # one store for the sweep, at its root
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2"]
    (group,) = {r.data.tags["group"] for r in runs}  # the overrides without the seed
    assert "trainer.lr=" in group and "seed" not in group and {r.info.status for r in runs} == {"FINISHED"}
    dirs = sorted(p.parent for p in sweep.rglob("run_info.json"))
    assert [d.name for d in dirs] == ["seed=1", "seed=2"]
    wb = [wandb_run(d) for d in dirs]
    assert [w["group"] for w in wb] == [{group}] * 2 and len(wb[0]["ids"] | wb[1]["ids"]) == 2
    assert [w["exit"] for w in wb] == [[0], [0]] and [w["summary"]["status"] for w in wb] == ["completed"] * 2
    for d, w in zip(dirs, wb):
        steps = [h["global_step"] for h in w["history"] if "train/loss" in h]
        assert steps == [r["step"] for r in jsonl(d / "metrics.jsonl") if r["split"] == "train"]
        assert "train/loss" in tensorboard_scalars(d / "tensorboard")


@pytest.mark.slow  # a new MLflow store and a W&B run: 14 s on 2 shared cores (load 9)
@needs_trackers
@needs_data()
def test_a_failed_run_ends_its_tracker_runs_failed(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, err = robustft(monkeypatch, capsys, "logger=[mlflow,wandb]", "trainer.max_length=2", f"hydra.run.dir={run}")
    assert code == 2 and "trainer.max_length=2 is too small" in err
    (mrun,) = mlflow_runs(f"sqlite:///{run / 'mlflow.db'}")
    assert mrun.info.status == "FAILED" and mrun.data.tags["status"] == "failed"
    assert wandb_run(run)["exit"] == [1]
