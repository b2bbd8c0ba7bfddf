"""trainer.threads (issue 25): torch threads = the cores available divided among local jobs, set at run start."""

from __future__ import annotations

import logging

import pytest
import torch

from robustft import threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, local, parallel, omp, expected", [
    (8, 1, False, None, 8),    # a run alone: every core it may use
    (8, 4, False, None, 2),    # torchrun, 4 processes on this node: the cores shared among them
    (8, 16, False, None, 1),   # never 0
    (8, 1, True, None, 1),     # one job of a submitit_local / joblib sweep
    (8, 1, True, "4", 1),      # ... whatever OMP_NUM_THREADS says
    (8, 1, False, "3", 3),     # the user's OMP_NUM_THREADS
    (8, 1, False, "x", 8),     # an unusable value is ignored
])
def test_auto_threads(cores, local, parallel, omp, expected):
    assert threads.auto_threads(cores, local, parallel, omp) == expected


def test_configure_sets_torch_threads_and_warns_when_busy(monkeypatch, caplog):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 5.0, 5.0))
    with caplog.at_level(logging.WARNING, logger="robustft"):
        assert threads.configure(1) == 1
    assert torch.get_num_threads() == 1
    assert "load average 5.0 on 2 cores" in caplog.text and "slower" in caplog.text


def test_configure_auto_quiet_machine(monkeypatch, caplog):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with caplog.at_level(logging.WARNING, logger="robustft"):
        assert threads.configure("auto") == 2
    assert torch.get_num_threads() == 2 and caplog.text == ""


def test_submitit_local_job_is_a_parallel_sweep_job(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert threads.parallel_sweep_job()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert not threads.parallel_sweep_job()
