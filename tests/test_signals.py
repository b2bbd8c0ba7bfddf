"""Ctrl-C (SIGINT) during training behaves like SIGTERM (issue #25 item 6): one line naming the step and the
fix, exit 130, no KeyboardInterrupt traceback, run_info `interrupted` with the attempt's wall time, and the
same command resumes (the resume itself: tests/test_cli.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from tests.conftest import DATA_DIR, needs_data
from tests.test_cli import ROBUSTFT, cli_env, info


@needs_data()
def test_sigint_during_training_is_one_line_and_resumes(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    args = [*tiny_overrides, "trainer.max_steps=100000", "trainer.save_every=2", "trainer.eval_every=100000",
            f"data_dir={DATA_DIR}", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([ROBUSTFT, *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("robustft: error:")]
    assert len(lines) == 1 and err.rstrip("\n").splitlines()[-1] == lines[0], err[-2000:]
    assert re.fullmatch(rf"robustft: error: interrupted at step \d+ \(SIGINT\); rerun the same command with "
                        rf"hydra.run.dir={re.escape(str(run))} to resume", lines[0]), lines[0]
    run_info = info(run)
    assert run_info["status"] == "interrupted" and run_info["error"].startswith("interrupted at step")
    assert run_info["wall_time_s"] > 0 and run_info["attempts"] == 1


def masking_library() -> None:
    """What transformers' `tokenizer.pad` does: any Exception inside becomes its own ValueError."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    except Exception as e:
        raise ValueError("Unable to create tensor") from e


def test_a_signal_a_library_turned_into_its_own_error_is_still_the_signal(tmp_path):
    """The CI failure of stop 33: Ctrl-C landed inside `tokenizer.pad`, which re-raised the handler's `Signalled`
    as a ValueError, so the run was recorded `failed` and printed a traceback instead of exit 130."""
    from omegaconf import OmegaConf

    from robustft.cli import catch_sigterm
    from robustft.errors import Signalled
    from robustft.loop import names_the_step
    from robustft.rundir import RunDir, lifecycle

    cfg = OmegaConf.create({"seed": 1, "task": {"name": "sst2"}, "method": {"name": "vanilla"},
                            "model": {"name": "tiny"}})
    run = RunDir(tmp_path / "run")
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        catch_sigterm()
        loop = SimpleNamespace(state=SimpleNamespace(step=7))
        with pytest.raises(Signalled) as caught, lifecycle(run, cfg):
            names_the_step(lambda _self: masking_library())(loop)
        assert caught.value.signum == signal.SIGINT and caught.value.step == 7
        assert isinstance(caught.value.__cause__, ValueError)
        assert info(run.path)["status"] == "interrupted"
        assert info(run.path)["error"] == "interrupted at step 7 (SIGINT)"

        catch_sigterm()  # outside the loop (a final evaluation): no step to name, still the signal
        with pytest.raises(Signalled) as caught, lifecycle(run, cfg):
            masking_library()
        assert caught.value.step is None and info(run.path)["status"] == "interrupted"

        catch_sigterm()  # no signal pending: a library's own error stays what it is
        with pytest.raises(ValueError), lifecycle(run, cfg):
            raise ValueError("a real error")
        assert info(run.path)["status"] == "failed"
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
        Signalled.pending = None
