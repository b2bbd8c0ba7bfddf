"""`logger=[...]` across processes (issue 30): a real `mlflow server`, SIGTERM then resume, a 2-rank torchrun.

Each test starts processes (the server, robustft, torchrun's ranks), so all are marked slow; `.ci/run` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, needs_data
from tests.tracker_readers import tensorboard_scalars, wandb_run

pytestmark = [needs_data(), pytest.mark.slow,
              pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("tensorboard", "mlflow", "wandb")),
                                 reason="pip install -e '.[loggers]' (tensorboard, mlflow, wandb)")]

TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=64", "task.max_eval_samples=32",
        "trainer.batch_size=8", "trainer.log_every=2", "trainer.precision=fp32", "trainer.max_length=32",
        f"data_dir={DATA_DIR}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore")


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, a free port); stopped (its process group) at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(), "--workers", "1"],
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def robustft(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "robustft", *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_mlflow_server_sigterm_then_resume_is_one_run_read_back_by_mlflow_client(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    run = tmp_path / "run"
    args = [*TINY, "trainer.epochs=40", "trainer.eval_every=8", "trainer.save_every=4",
            "logger=[mlflow,wandb]", f"logger.mlflow.tracking_uri={mlflow_server}", "logger.mlflow.experiment_name=issue30",
            "logger.wandb.tags=[ci]", f"hydra.run.dir={run}"]
    first = robustft(args, tmp_path)
    deadline = time.monotonic() + 300
    while not [r for r in rows(run) if r["step"] >= 10] and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)  # as a preemption would
    _, err = first.communicate(timeout=120)
    assert first.returncode == 3 and "(SIGTERM)" in err, err[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    (exp,) = [e for e in client.search_experiments() if e.name == "issue30"]
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "KILLED" and killed.data.tags["status"] == "interrupted"

    second = robustft(args, tmp_path)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    (done,) = client.search_runs([exp.experiment_id])  # the same run, continued
    assert done.info.run_id == killed.info.run_id and done.info.status == "FINISHED"
    record, final = rows(run), json.loads((run / "metrics.json").read_text())
    train = [(r["step"], r["loss"]) for r in record if r["split"] == "train"]
    history = client.get_metric_history(done.info.run_id, "train/loss")
    assert sorted((m.step, pytest.approx(m.value)) for m in history) == train  # every step once
    val = client.get_metric_history(done.info.run_id, "validation/accuracy")
    assert sorted(m.step for m in val) == [r["step"] for r in record if r["split"] == "validation"]
    assert done.data.metrics["final/validation/accuracy"] == pytest.approx(final["validation/accuracy"])
    assert done.data.params["trainer.epochs"] == "40" and done.data.params["model.name"] == "tiny_random"
    info = json.loads((run / "run_info.json").read_text())
    assert info["attempts"] == 2 and done.data.tags["git_sha"] == str(info["git_sha"])
    assert done.data.tags["run_dir"] == str(run.resolve()) and done.data.tags["seed"] == "42"

    wb = wandb_run(run)  # two offline segments of one W&B run, the second after the first's last step
    assert len(wb["ids"]) == 1 and wb["exit"] == [1, 0] and "ci" in wb["tags"]
    steps = [h["global_step"] for h in wb["history"] if "train/loss" in h]
    assert steps == [s for s, _ in train]


def test_two_rank_run_logs_once(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "robustft", *TINY, "trainer.epochs=1", "trainer.eval_every=4",
           "logger=[tensorboard,mlflow,csv]", f"hydra.run.dir={run}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    runs = [x for e in client.search_experiments() for x in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone opened a tracker run
    train = [r["step"] for r in rows(run) if r["split"] == "train"]
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == train
    assert [s for s, _ in tensorboard_scalars(run / "tensorboard")["train/loss"]] == train
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) <= 2  # the writer's + the HParams one
