"""The bundled offline metric modules (robustft/metrics): shipped as package data, loadable with
`evaluate.load` from their folders, and never a network access, with or without the offline env vars."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import tomllib
from omegaconf import OmegaConf

from robustft.cli import CONF_DIR
from robustft.errors import UserError
from robustft.metrics import COMBINED, METRIC_NAMES, METRICS_DIR, load_metric, main_metric, task_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = tuple(sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")))


def task(name: str):
    return OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")


@pytest.fixture
def no_network(monkeypatch):
    """Refuse host-name lookups and connections like an offline node, and fail if any was attempted.

    Attempts are recorded (not only raised) because evaluate swallows some errors of its Hub lookups.
    """
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable (blocked by test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts!r}"


def set_offline_flags(monkeypatch, offline: bool) -> None:
    """Set the env vars and the flags that evaluate/huggingface_hub/datasets read from them at import time."""
    import datasets
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline:
            monkeypatch.setenv(var, "1")
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    if hasattr(datasets.config, "HF_HUB_OFFLINE"):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)


def smoke_inputs(name: str) -> tuple[list, list]:
    if name in ("pearson", "spearmanr"):
        return [0.5, 1.0, 2.5, 4.0], [1.0, 1.5, 2.0, 4.5]
    return [0, 1, 1, 0], [0, 1, 0, 0]


# --------------------------------------------------------------------------------------------- layout


def test_metric_folders_exist_and_ship_as_package_data():
    assert METRICS_DIR == Path(__file__).resolve().parents[1] / "robustft" / "metrics"
    # robustft/metrics holds exactly the modules the task configs name
    assert set(METRIC_NAMES) == {m for t in TASKS for m in task(t).metrics}
    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["robustft"]
    package_dir = METRICS_DIR.parent
    shipped = {p.relative_to(package_dir).as_posix() for pat in patterns for p in package_dir.glob(pat)}
    assert {f"metrics/{name}/{name}.py" for name in METRIC_NAMES} <= shipped


# ------------------------------------------------------------------------------------ evaluate.load


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_evaluate_load_of_each_folder(name, no_network):
    module = evaluate.load(str(METRICS_DIR / name))
    assert isinstance(module, evaluate.EvaluationModule)
    preds, refs = smoke_inputs(name)
    result = module.compute(predictions=preds, references=refs)
    assert result and all(isinstance(v, float) for v in result.values())


@pytest.mark.parametrize("offline", [True, False], ids=["offline-env", "no-env"])
def test_loading_never_touches_network(monkeypatch, no_network, offline):
    set_offline_flags(monkeypatch, offline)
    for name in METRIC_NAMES:
        module = evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
        assert module.compute(predictions=smoke_inputs(name)[0], references=smoke_inputs(name)[1])
    load_metric.cache_clear()  # force real (uncached) loads through the public helper too
    assert task_metrics(task("mrpc"), [0, 1, 1], [0, 1, 0])["accuracy"] == pytest.approx(2 / 3)
    assert task_metrics(task("stsb"), [0.1, 2.0, 3.5], [0.0, 2.5, 3.0])["combined_score"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False], ids=["offline-env", "no-env"])
def test_loading_in_fresh_process(offline):
    """Env vars set before evaluate is imported (what the monkeypatched test can only emulate)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network access attempted')\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        "from robustft.metrics import task_metrics\n"
        "cola = {'name': 'cola', 'metrics': ['matthews_correlation'], 'is_regression': False}\n"
        "print(task_metrics(cola, [0, 1, 1, 0], [0, 1, 0, 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert "matthews_correlation" in out.stdout


def test_unknown_metrics_and_main_metrics_are_one_line_errors():
    with pytest.raises(ValueError, match="bundled metrics"):
        load_metric("bleu")
    with pytest.raises(UserError, match="unknown metric 'bleu'; choose from accuracy"):
        task_metrics({"name": "x", "metrics": ["accuracy", "bleu"], "is_regression": False}, [0], [0])
    with pytest.raises(UserError, match="names no metrics"):
        main_metric({"name": "x", "metrics": [], "main_metric": "accuracy"})
    with pytest.raises(UserError, match="main_metric=f1 of x is not one of its metrics; choose from accuracy$"):
        main_metric({"name": "x", "metrics": ["accuracy"], "main_metric": "f1"})
    # combined_score exists only with several metrics
    assert main_metric({"name": "x", "metrics": ["accuracy", "f1"], "main_metric": COMBINED}) == COMBINED
    with pytest.raises(UserError, match="choose from accuracy"):
        main_metric({"name": "x", "metrics": ["accuracy"], "main_metric": COMBINED})


def test_load_metric_is_cached():
    assert load_metric("f1") is load_metric("f1")
    assert load_metric("f1") is not load_metric("accuracy")
