"""Packaging and the hub code path (which cannot reach the hub here, so it is exercised with a stand-in)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

from robustft import data as data_mod
from robustft.cli import CONF_DIR
from robustft.errors import UserError
from tests.conftest import REPO


def test_wheel_ships_configs_and_metric_modules(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("robustft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in CONF_DIR.rglob("*.yaml"):
        assert f"robustft/conf/{yaml.relative_to(CONF_DIR).as_posix()}" in names
    assert "robustft/metrics/accuracy/accuracy.py" in names
    assert "hydra_plugins/robustft_optuna_sweeper/optuna_sweeper.py" in names  # hydra/sweeper=optuna's class
    assert "hydra_plugins/robustft_slurm/launcher.py" in names  # hydra/launcher=slurm's class (Hydra's namespace)
    assert (REPO / "conf").resolve() == CONF_DIR  # the top-level `conf` points at the packaged configs


def test_hub_path_maps_splits_and_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        split = Dataset.from_dict({"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [0, -1, 2]})
        return DatasetDict({"train": split, "validation": split, "test": split})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.delenv("ROBUSTFT_DATA_DIR", raising=False)
    task = OmegaConf.load(CONF_DIR / "task" / "snli.yaml")
    task.selection = "dev"  # the hub's own validation split (the default carve needs more than 3 rows)
    ds = data_mod.load_task(task, None, seed=0)
    assert calls == [("stanfordnlp/snli", None)]
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"]["label"] == [0, 2]  # SNLI's -1 (no gold label) is dropped
    assert ds["train"].column_names == ["idx", "premise", "hypothesis", "label"]


def test_hub_failure_says_how_to_go_offline(monkeypatch):
    def broken(*_a, **_k):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", broken)
    monkeypatch.delenv("ROBUSTFT_DATA_DIR", raising=False)
    task = OmegaConf.load(CONF_DIR / "task" / "rte.yaml")
    with pytest.raises(UserError, match="set data_dir="):
        data_mod.load_task(task, None, seed=0)
