"""A run directory belongs to one config and one process; what robustft saved is what it loads (issue 25).

Each case runs the console script in-process like tests/test_bad_inputs.py (its helpers) and asserts the
exit code, exactly one `robustft: error:` line, no traceback, and that nothing says completed: no summary
table, and no run_info.json turned `completed` (a folder that was completed before is left as it was).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robustft import cli
from robustft.checkpoint import CHECKSUMS, load_training_state, save_checkpoint, verify_checksums
from robustft.models import load_model, load_tokenizer
from tests.conftest import REPO, make_cfg, needs_data
from tests.test_bad_inputs import TINY, isolated_process_state, one_error_line, robustft, statuses  # noqa: F401

pytestmark = needs_data()


@pytest.fixture
def summaries(monkeypatch) -> list[Path]:
    """The run directories whose summary table was printed (a rerun of a completed run prints the old one)."""
    printed: list[Path] = []
    monkeypatch.setattr(cli, "print_summary", lambda run_dir, cfg: printed.append(run_dir.path))
    return printed


def info(run: Path) -> dict:
    return json.loads((run / "run_info.json").read_text())


# ---------------------------------------------------------------- one config per run directory


def test_rerun_of_a_completed_run_with_another_config(tmp_path, monkeypatch, capsys, summaries):
    run = tmp_path / "run"
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}")[0] == 0
    before = (run / "run_info.json").read_text()
    summaries.clear()
    line = one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.lr=0.002"),
                          "trainer.lr: 0.001 -> 0.002", str(run), "hydra.run.dir", "resume=never")
    assert summaries == [] and (run / "run_info.json").read_text() == before, line  # the old run, untouched
    # options that cannot change the results may differ: the completed run is reported as before
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.log_every=3", "tag=again")[0] == 0
    assert summaries == [run] and (run / "run_info.json").read_text() == before
    # resume=never starts the folder over with the new config
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.lr=0.002", "resume=never")[0] == 0
    assert info(run)["status"] == "completed" and info(run)["attempts"] == 2
    assert "lr: 0.002" in (run / "run_config.yaml").read_text()


def test_resume_with_another_config(tmp_path, monkeypatch, capsys, summaries):
    run = tmp_path / "run"
    code, err = robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "+trainer.interrupt_at_step=1")
    assert code == 3 and info(run)["status"] == "interrupted", err
    one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.max_steps=4", "seed=7"),
                   "seed: 42 -> 7", "trainer.max_steps: 2 -> 4")
    assert statuses(run) == ["interrupted"] and summaries == []
    # the same config (interrupt_at_step is a test hook that may differ) resumes and completes
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}")[0] == 0
    assert info(run)["status"] == "completed" and info(run)["resumed_from_step"] == 1


def test_a_second_run_in_a_held_folder(tmp_path, monkeypatch, capsys, summaries):
    """A live holder is named by PID; once it is dead (kill -9), its lock is taken over."""
    run = tmp_path / "run"
    run.mkdir()
    hold = ("import sys, time; from robustft.rundir import RunDir; "
            "held = RunDir(sys.argv[1], writer=True).hold('hydra.run.dir'); held.__enter__(); print('held', flush=True); "
            "time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}"), f"process {holder.pid} ",
                       "in use", "hydra.run.dir")
        assert statuses(run) == [] and summaries == []
    finally:
        holder.kill()
        holder.wait()
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}")[0] == 0
    assert info(run)["status"] == "completed"


# ---------------------------------------------------------------- what was saved is what is loaded


def test_resume_from_a_changed_checkpoint(tmp_path, monkeypatch, capsys, summaries):
    run = tmp_path / "run"
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "+trainer.interrupt_at_step=1")[0] == 3
    last = run / "checkpoints" / "last"
    if shutil.which("sha256sum"):  # the record is in sha256sum's format
        assert subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUMS], cwd=last).returncode == 0
    state = last / "training_state.safetensors"
    blob = bytearray(state.read_bytes())
    blob[-1] ^= 1  # one bit of the last tensor's data: still a valid file
    state.write_bytes(bytes(blob))
    one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}"), str(state), "sha256", "resume=never")
    assert statuses(run) == ["failed"] and summaries == []


def test_disk_fills_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys, summaries):
    """The second checkpoints/last write fails half-way (ENOSPC): one line, status failed, no .tmp- folder, and
    the first checkpoint intact (its sha256 record holds) to resume from."""
    import robustft.checkpoint as ckpt

    calls, real = [], ckpt.save_file

    def fills_up(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 1:
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    run = tmp_path / "run"
    one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.max_steps=4"),
                   "No space left on device", "hydra.run.dir")
    assert len(calls) == 2 and statuses(run) == ["failed"] and summaries == []
    assert not list((run / "checkpoints").glob(".tmp-*")), list((run / "checkpoints").iterdir())
    verify_checksums(run / "checkpoints" / "last")
    assert load_training_state(run / "checkpoints" / "last")["progress"]["step"] == 2
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed: the same command resumes from it
    assert robustft(monkeypatch, capsys, f"hydra.run.dir={run}", "trainer.max_steps=4")[0] == 0
    assert info(run)["status"] == "completed" and info(run)["resumed_from_step"] == 2


@pytest.fixture(scope="module")
def other_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of another architecture (hidden 48, not tiny_random's 32; a 1000-token vocabulary beside
    MiniLM's tokenizer) and of another task (SNLI, 3 labels)."""
    root = tmp_path_factory.mktemp("other")
    out = {}
    cases = {"hidden48": ["model.config_overrides.hidden_size=48"], "snli": ["task=snli"],
             "vocab1000": ["+model.config_overrides.vocab_size=1000"]}
    for name, over in cases.items():
        cfg = make_cfg([*TINY, *over])
        save_checkpoint(root / name, load_model(cfg.model, cfg.task), load_tokenizer(cfg.model), None)
        out[name] = root / name
    return out


@pytest.mark.parametrize("train", ["false", "true"], ids=["eval", "init"])
@pytest.mark.parametrize("which, words", [
    ("hidden48", ["hidden_size=48", "model=tiny_random sets hidden_size=32"]),
    ("snli", ["3 labels (entailment, neutral, contradiction)", "task sst2 has 2 labels", "task="]),
    ("vocab1000", ["vocab_size=1000", "tokenizer has 30522 tokens"]),  # the tokenizer saved beside it: MiniLM's
])
def test_checkpoint_of_another_model_or_task(which, words, train, other_ckpts, tmp_path, monkeypatch, capsys,
                                             summaries):
    run = tmp_path / "run"
    line = one_error_line(*robustft(monkeypatch, capsys, f"train={train}", f"ckpt_path={other_ckpts[which]}",
                                    f"hydra.run.dir={run}"), str(other_ckpts[which]), *words)
    assert statuses(run) == ["failed"] and summaries == [], line
