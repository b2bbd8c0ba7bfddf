"""Ctrl-C (SIGINT) during training behaves like SIGTERM (issue #25 item 6): one line naming the step and the
fix, exit 130, no KeyboardInterrupt traceback, run_info `interrupted` with the attempt's wall time, and the
same command resumes (the resume itself: tests/test_cli.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import time

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
