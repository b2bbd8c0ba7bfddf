"""A new user's first hour: the quick start, what the terminal shows, a fast --help, capped data loading."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf

from robustft import cli
from robustft.cli import CONF_DIR, headline_rows
from robustft.data import load_task, read_glue_tsv
from robustft.progress import Progress, bars_closed
from tests.conftest import DATA_DIR, make_cfg, needs_data
from tests.test_cli import ROBUSTFT, cli_env, one_line_exit, run_all

TINY_QUICKSTART = ["experiment=quickstart", "model=tiny_random", "trainer.max_steps=2", "trainer.save_checkpoints=false",
                   "robustness.textfooler.num_examples=4", "robustness.textfooler.goal.query_budget=20",
                   f"data_dir={DATA_DIR}"]


# ---------------------------------------------------------------- the quick start


def test_quickstart_composes_and_the_command_line_still_wins():
    cfg = make_cfg(["experiment=quickstart"])
    assert (cfg.model.name, cfg.task.name, cfg.method.name) == ("minilm", "sst2", "vanilla")
    assert set(cfg.robustness) == {"advglue", "textfooler"}
    assert cfg.trainer.lr == cfg.model.lr == 1e-4 and cfg.trainer.epochs == 1
    assert 1000 <= cfg.task.max_train_samples <= 10000 and cfg.robustness.textfooler.num_examples <= 200
    over = make_cfg(["experiment=quickstart", "model=tiny_random", "task.max_train_samples=8", "trainer.epochs=2"])
    assert (over.model.name, over.task.max_train_samples, over.trainer.epochs) == ("tiny_random", 8, 2)
    assert not make_cfg([]).get("robustness")  # no experiment: the plain defaults


def test_unknown_experiment_is_a_one_line_error(capsys):
    line = one_line_exit(capsys, cli.preflight, ["experiment=nope"])
    assert "unknown experiment 'nope'" in line and "quickstart" in line


def test_help_imports_no_torch():
    """`robustft --help` must answer at once: torch, transformers and datasets load only when a run starts."""
    code = ("import sys; sys.argv = ['robustft', '--help']; from robustft import cli\ntry:\n    cli.main()\n"
            "except SystemExit:\n    pass\nprint('heavy:', sorted(m for m in ('torch', 'transformers', 'datasets') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "heavy: []" in r.stdout
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("experiment:")]
    assert "quickstart" in line


@needs_data()
def test_quickstart_runs_and_prints_the_summary(tmp_path):
    """The quick start end to end on the tiny model (stdout is not a TTY: plain step lines)."""
    run = tmp_path / "qs"
    procs = run_all({"qs": [*TINY_QUICKSTART, "trainer.log_every=1", f"hydra.run.dir={run}"]}, tmp_path)
    r = procs["qs"]
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    lines = [ln for ln in out.splitlines() if "[robustft][INFO]" in ln]
    assert lines[0].endswith(f"run directory: {run}")  # the first thing a run says, before loading data
    assert re.search(r"step 1/2 loss \d\.\d{4} lr \S+ \d+\.\d ex/s", out)
    metrics = json.loads((run / "metrics.json").read_text())
    table = out[out.index("summary: sst2, vanilla, tiny_random, seed 42"):]
    for what, key in [("clean validation accuracy (selection: train, carved", "validation/accuracy"),
                      ("clean test accuracy (held out: official dev)", "test/accuracy"), ("advglue accuracy", "advglue/accuracy"),
                      ("textfooler: clean accuracy", "textfooler/clean_acc"),
                      ("textfooler: accuracy under attack", "textfooler/acc_under_attack")]:
        row = next(ln for ln in table.splitlines() if what in ln)
        assert f"{metrics[key]:.4f}" in row and key in row, row
    assert f"run directory: {run}" in table.splitlines()[-1]


def test_summary_prints_a_run_directory_with_brackets_verbatim(tmp_path, capsys):
    """A sweep subdir named by a list override (`robustness=[advglue,textfooler]`) is printed as it is, not
    read as rich markup (which dropped the bracketed part)."""
    from types import SimpleNamespace

    run = tmp_path / "robustness=[advglue,textfooler],task=sst2" / "seed=1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"validation/accuracy": 0.5}))
    info = {"main_metric": "validation/accuracy"}
    cfg = OmegaConf.create({"task": {"name": "sst2"}, "method": {"name": "vanilla"}, "model": {"name": "m"},
                            "seed": 1, "robustness": {}})
    cli.print_summary(SimpleNamespace(path=run, info=info), cfg)
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out.replace("\n", "")


def test_headline_rows_follow_what_each_evaluator_reports():
    metrics = {"validation/mcc": 0.5, "test/mcc": 0.4, "advglue/accuracy": 0.3, "advglue/overall": 0.31,
               "advglue/n": 148.0, "pwws/acc_under_attack": 0.1, "pwws/n": 50.0, "ood/yelp_accuracy": 0.8,
               "ood/yelp_n": 100.0, "ood/imdb_accuracy": 0.7, "ood/imdb_n": 90.0, "missing/x": 1.0}
    rows = headline_rows(metrics, "validation/mcc", ["advglue", "pwws", "ood", "missing"])
    assert rows == [("clean validation mcc", "validation/mcc", ""), ("advglue accuracy", "advglue/accuracy", "advglue/n"),
                    ("pwws: accuracy under attack", "pwws/acc_under_attack", "pwws/n"),
                    ("ood imdb accuracy", "ood/imdb_accuracy", "ood/imdb_n"),
                    ("ood yelp accuracy", "ood/yelp_accuracy", "ood/yelp_n")]
    # the held-out split's row follows the selection split's (once: with selection=dev they are one split)
    assert headline_rows(metrics, "validation/mcc", [], ("test/mcc",))[1] == ("clean test mcc", "test/mcc", "")
    assert len(headline_rows(metrics, "validation/mcc", [], ("validation/mcc",))) == 1


# ---------------------------------------------------------------- progress


def test_rates_are_current_not_whole_run_averages():
    bar = Progress(total=10, enabled=False, completed=4, examples=400, train_s=100.0)  # resumed at step 4
    for step in range(1, 4):  # 10 examples/s now, 4 examples/s before the resume
        bar.update(1, examples=400 + 10 * step, train_s=100.0 + step, loss=0.5)
    assert bar.window_rate() == pytest.approx(10.0) and bar.current_rate() == pytest.approx(10.0)
    bar.update(1, examples=460, train_s=104.0)  # a slow step: 30 examples in 1 s
    assert bar.window_rate() == pytest.approx(30.0)  # the new window only
    for step in range(5, 40):  # a long stretch at 20 examples/s: the bar's rate forgets the old steps
        bar.update(1, examples=460 + 20 * (step - 4), train_s=100.0 + step)
    assert bar.current_rate() == pytest.approx(20.0)
    bar.close()
    bar.close()  # twice is fine


def test_bars_closed_stops_a_live_bar_and_restores_logging(monkeypatch):
    import logging

    class Tty:  # a stand-in terminal
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: draw as on a terminal
    handler = logging.StreamHandler(tty)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt), bars_closed():
            bar = Progress(total=5, enabled=True, desc="vanilla sst2")
            bar.update(1, examples=8, train_s=0.5, loss=0.69)
            assert handler.stream is not tty  # while drawn, log lines go above the bar
            raise KeyboardInterrupt
        assert handler.stream is tty and bar._bar is None
        assert "\x1b[?25h" in tty.text and "1/5" in tty.text and "loss 0.6900" in tty.text  # cursor shown again
    finally:
        logging.getLogger().removeHandler(handler)


@needs_data()
def test_sigterm_stops_the_bar_before_the_message(tmp_path, tiny_overrides):
    """On a terminal: the bar is drawn, SIGTERM arrives, the bar is stopped and the cursor shown, then one line."""
    args = [*tiny_overrides, "trainer.epochs=10000", "trainer.save_every=100000",  # 80,000 steps: never ends
            "trainer.eval_every=100000", f"data_dir={DATA_DIR}", f"hydra.run.dir={tmp_path / 'run'}"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen([ROBUSTFT, *args], stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path,
                            env={**cli_env(), "COLUMNS": "160"}, close_fds=True)
    os.close(follower)
    out, sent = b"", False
    deadline = time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        if not sent and re.search(rb"loss \d\.\d{4}", out):  # the bar is drawn and training
            proc.send_signal(signal.SIGTERM)
            sent = True
        if proc.poll() is not None and not ready:
            break
    proc.wait(timeout=30)
    os.close(leader)
    text = out.decode(errors="replace")
    assert sent and proc.returncode == 3, text[-2000:]
    message = text.index("robustft: error: interrupted at step ")
    assert re.match(r"robustft: error: interrupted at step \d+ \(SIGTERM\); rerun the same command", text[message:])
    assert text.rfind("\x1b[?25h", 0, message) > text.rfind("\x1b[?25l", 0, message) >= 0  # cursor back first
    before = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text[:message])  # without colour and cursor codes
    last = before.rstrip("\r\n").rsplit("\r", 1)[-1]  # what the terminal shows on the line above the message
    assert before.endswith("\r\n") and re.search(r"\d+/80000 loss \d\.\d{4} [\d.]+ ex/s .* eta ", last), last
    assert "ex/s" not in text[message:]  # the message on a line of its own, and no bar redrawn after it


# ---------------------------------------------------------------- capped data loading


@needs_data()
@pytest.mark.parametrize("seed,n", [(42, 64), (7, 2000), (0, 70000)])
def test_capped_train_is_the_same_sample_as_shuffle_then_select(seed, n):
    """load_task caps train while reading; the rows and their order are the old shuffle(seed).select(range(n))."""
    task = OmegaConf.merge(OmegaConf.load(CONF_DIR / "task" / "sst2.yaml"), {"max_train_samples": n})
    spec = OmegaConf.to_container(task.local.train)
    full = Dataset.from_dict(read_glue_tsv(DATA_DIR / spec["file"], spec, task))
    old = full.shuffle(seed=seed).select(range(min(n, len(full))))
    new = load_task(task, str(DATA_DIR), seed)["train"]
    assert new["idx"] == old["idx"] and new.to_dict() == old.to_dict()
    assert new.features == old.features
    assert len(new) == min(n, 67349) and new._indices is None  # a table of the sample only, no indices mapping


@needs_data()
def test_tasks_without_a_dev_file_still_carve_it_from_all_of_train(tmp_path):
    """SNLI-style: the dev split comes out of the full train first, then train is capped (the old path)."""
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    with open(DATA_DIR / "glue" / "SST-2" / "train.tsv") as f:
        (folder / "train.tsv").write_text("".join(next(f) for _ in range(201)))
    task = OmegaConf.load(CONF_DIR / "task" / "sst2.yaml")
    task.local.pop("validation")
    task = OmegaConf.merge(task, {"selection": "carve", "selection_size": 50, "max_train_samples": 20})
    ds = load_task(task, str(tmp_path), seed=3)
    spec = OmegaConf.to_container(task.local.train)
    split_seed = int(task.split_seed)  # the dev carve uses the task's split seed, the cap the run seed
    parts = Dataset.from_dict(read_glue_tsv(folder / "train.tsv", spec, task)).train_test_split(test_size=50,
                                                                                               seed=split_seed)
    assert ds["validation"]["idx"] == parts["test"]["idx"]
    assert ds["train"]["idx"] == parts["train"].shuffle(seed=3).select(range(20))["idx"]


def test_config_defaults_end_with_the_experiment_group():
    """An experiment file overrides the groups only when it comes last in the defaults list (then the
    recipe's arm, which sets one method's options inside the experiment's grid)."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    assert OmegaConf.to_container(defaults[-2]) == {"optional experiment": None}
    assert OmegaConf.to_container(defaults[-1]) == {"optional arm": None}
    assert all(Path(p).read_text().startswith("# @package _global_") for p in (CONF_DIR / "experiment").glob("*.yaml"))
