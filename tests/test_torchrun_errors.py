"""`robustft-torchrun` (issue 25): under torchrun a bad input is robustft's one line and exit 2, not torchrun's
ChildFailedError traceback and exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustft import torchrun
from tests.conftest import DATA_DIR, needs_data
from tests.ddp_helpers import free_port

pytestmark = needs_data()

TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=16", "task.max_eval_samples=16",
        "trainer.max_steps=2", "trainer.batch_size=8", "trainer.eval_every=2", "trainer.precision=fp32",
        "trainer.max_length=32"]


def test_split_args():
    assert torchrun.split_args(["--nproc_per_node=2", "--master_port", "29500", "task=rte", "seed=1"]) == (
        ["--nproc_per_node=2", "--master_port", "29500"], ["task=rte", "seed=1"])
    assert torchrun.split_args(["--standalone"]) == (["--standalone"], [])


@pytest.mark.parametrize("args, words", [
    (["trainer.lr=-1"], "trainer.lr=-1 must be >= 0"),
    (["-m", "seed=1,2"], "-m (a sweep) cannot run under torchrun"),
])
def test_preflight_error_in_the_launching_process(args, words, tmp_path, monkeypatch, capsys):
    """The pre-flight runs before torchrun starts any child: one line, exit 2, nothing created."""
    monkeypatch.setattr(sys, "argv", ["robustft-torchrun", "--nproc_per_node=2", f"data_dir={DATA_DIR}", *TINY, *args,
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:
        torchrun.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"robustft: error: {words}"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_error_in_the_ranks_is_one_line_and_exit_2(tmp_path):
    """2 gloo ranks stop on a missing data file (found inside the run, after the pre-flight): rank 0's line once,
    exit 2, no traceback (plain torchrun: its ChildFailedError traceback, exit 1). ~1 min on 2 busy cores."""
    (tmp_path / "empty").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-m", "robustft.torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
                        *TINY, f"data_dir={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("robustft: error: ") == 1 and "missing data file" in r.stderr, r.stderr[-3000:]
    assert "completed" not in (tmp_path / "run" / "run_info.json").read_text()
