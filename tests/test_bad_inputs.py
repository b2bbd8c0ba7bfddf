"""Bad input (issue 19): one line `robustft: error: <problem>; <fix>`, exit 2, no run dir that says completed.

Every case runs the console script in-process (`cli.main` with a patched argv) on a 16-example slice with
the tiny random model, so the whole file takes seconds; full-disk and read-only folders are simulated
with an OSError where a real one needs root or a small filesystem.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import struct
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from robustft import cli
from robustft.errors import UserError
from tests.conftest import DATA_DIR, make_cfg, needs_data

pytestmark = needs_data()

TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=16", "task.max_eval_samples=16",
        "trainer.max_steps=2", "trainer.batch_size=8", "trainer.eval_every=2", "trainer.precision=fp32",
        "trainer.max_length=32"]


@pytest.fixture(autouse=True)
def isolated_process_state():
    """cli.main configures logging (Hydra), a SIGTERM handler and Hydra's globals: put them back."""
    from hydra.core.global_hydra import GlobalHydra

    loggers = [logging.getLogger(), logging.getLogger("hydra")]
    saved = [(lg, lg.handlers[:], lg.level) for lg in loggers]
    sigterm = signal.getsignal(signal.SIGTERM)
    sigint = signal.getsignal(signal.SIGINT)  # cli.run catches Ctrl-C too
    yield
    for lg, handlers, level in saved:
        for h in lg.handlers:
            if h not in handlers:
                h.close()
        lg.handlers[:], lg.level = handlers, level
    signal.signal(signal.SIGTERM, sigterm)
    signal.signal(signal.SIGINT, sigint)
    GlobalHydra.instance().clear()


def robustft(monkeypatch, capsys, *args: str, data_dir: Path = DATA_DIR, tiny: list[str] = TINY) -> tuple[int, str]:
    """Run `robustft <args>` in-process on the `tiny` set-up; returns (exit code, stderr)."""
    flags = [a for a in args if a.startswith("-")]  # e.g. -m: before the overrides, as argparse wants
    overrides = [a for a in args if not a.startswith("-")]
    monkeypatch.setattr(sys, "argv", ["robustft", *flags, *tiny, f"data_dir={data_dir}", *overrides])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str, *words: str) -> str:
    """Exit 2 and stderr exactly one `robustft: error: <problem>; <fix>` line naming `words`."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("robustft: error: "), err[-3000:]
    line = err.strip()
    assert "; " in line, line  # problem; fix
    assert all(w in line for w in words), (words, line)
    return line


def statuses(root: Path) -> list[str]:
    return [json.loads(p.read_text())["status"] for p in root.rglob("run_info.json")]


# ---------------------------------------------------------------- config values: the pre-flight, no run dir


CONFIG_CASES = {
    "negative_lr": (["trainer.lr=-1e-3"], ["trainer.lr=-0.001", ">= 0"]),
    "batch_size_0": (["trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]),
    "grad_accum_0": (["trainer.grad_accum=0"], ["trainer.grad_accum=0"]),
    "eval_every_0": (["trainer.eval_every=0"], ["trainer.eval_every=0", "epoch"]),
    "log_every_0": (["trainer.log_every=0"], ["trainer.log_every=0"]),
    "save_every_0": (["trainer.save_every=0"], ["trainer.save_every=0"]),
    "eval_batch_size_0": (["trainer.eval_batch_size=0"], ["trainer.eval_batch_size=0"]),
    "device_tpu": (["trainer.device=tpu"], ["trainer.device=tpu", "cuda:N"]),
    "epochs_0": (["trainer.max_steps=-1", "trainer.epochs=0"], ["trainer.epochs=0", "trains nothing"]),
    "epochs_neg": (["trainer.max_steps=-1", "trainer.epochs=-1"], ["trainer.epochs=-1", "trains nothing"]),
    "weight_decay_neg": (["trainer.weight_decay=-1"], ["trainer.weight_decay=-1", ">= 0"]),
    "warmup_ratio_2": (["trainer.warmup_ratio=2"], ["trainer.warmup_ratio=2", "[0, 1]"]),
    "low_resource_n_0": (["stress=low_resource", "stress.low_resource.n=0"], ["stress.low_resource.n=0"]),
    "resume_maybe": (["resume=maybe"], ["resume=maybe", "auto", "never"]),
    "precision_fp16": (["trainer.precision=fp16"], ["trainer.precision=fp16", "auto, bf16 or fp32"]),
    "keep_checkpoints_last": (["trainer.keep_checkpoints=last"], ["trainer.keep_checkpoints=last", "all, best"]),
    # issue 25: numpy's seed range, sample caps that kept nothing (0) or all but one (-1), an imbalance
    # ratio of 0 that ran as "off", and the other numbers of tasks and stresses with the same hole
    "seed_negative": (["seed=-1"], ["seed=-1", "numpy's seed range"]),
    "seed_huge": (["seed=99999999999999"], ["seed=99999999999999", "4294967295"]),
    "max_train_samples_0": (["task.max_train_samples=0"], ["task.max_train_samples=0", "null", ">= 1"]),
    "max_train_samples_neg": (["task.max_train_samples=-1"], ["task.max_train_samples=-1", ">= 1"]),
    "max_eval_samples_0": (["task.max_eval_samples=0"], ["task.max_eval_samples=0", ">= 1"]),
    "imbalance_ratio_0": (["stress=imbalance", "stress.imbalance.ratio=0"], ["stress.imbalance.ratio=0", "(0, 1]"]),
    "imbalance_ratio_2": (["stress.imbalance.ratio=2"], ["stress.imbalance.ratio=2", "(0, 1]"]),
    "label_noise_rate_2": (["stress.label_noise.rate=2"], ["stress.label_noise.rate=2", "[0, 1]"]),
    "stress_seed_neg": (["stress.seed=-3"], ["stress.seed=-3", "seed range"]),
    "split_seed_neg": (["task.split_seed=-1"], ["task.split_seed=-1", "seed range"]),
    "eval_max_examples_0": (["trainer.eval_max_examples=0"], ["trainer.eval_max_examples=0", ">= 1"]),
    "max_grad_norm_neg": (["trainer.max_grad_norm=-1"], ["trainer.max_grad_norm=-1", ">= 0"]),
    "threads_0": (["trainer.threads=0"], ["trainer.threads=0", "auto"]),
    "selection_test": (["task.selection=test"], ["task.selection=test", "carve", "dev"]),
    "selection_size_0": (["task.selection=carve", "task.selection_size=0"], ["task.selection_size=0", "fraction"]),
    "selection_size_1_5": (["task.selection=carve", "task.selection_size=1.5"], ["task.selection_size=1.5", "count"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_value_fails_before_any_run_dir(case, tmp_path, monkeypatch, capsys):
    args, words = CONFIG_CASES[case]
    out = tmp_path / "out"
    dirs = [f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"]
    one_error_line(*robustft(monkeypatch, capsys, *args, *dirs), *words)
    assert not out.exists()  # the pre-flight stopped it


@pytest.mark.parametrize("override", ["trainer.device=", "trainer.eval_every=", "trainer.lr="])
def test_long_config_value_is_quoted_short(override, tmp_path, monkeypatch, capsys):
    """A 5,000-character value: the line quotes ~200 characters of it and its length."""
    line = one_error_line(*robustft(monkeypatch, capsys, override + "x" * 5000, f"hydra.run.dir={tmp_path / 'run'}"),
                          override.rstrip("="), "5,0")
    assert len(line) < 600, line


def test_fit_validates_in_process(tmp_path):
    """Callers of robustft.runner.fit (scripts, a sweep job) get the same check as the CLI."""
    from robustft.rundir import RunDir
    from robustft.runner import fit

    with pytest.raises(UserError, match=r"trainer.warmup_ratio=2 must be in \[0, 1\]"):
        fit(make_cfg([*TINY, "trainer.warmup_ratio=2"]), RunDir(tmp_path))


# ---------------------------------------------------------------- output directory


Usage = namedtuple("Usage", "total used free")


def test_output_dir_under_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    line = one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={tmp_path / 'file' / 'run'}"),
                          "hydra.run.dir")
    assert f"{tmp_path / 'file'} is a file" in line


def test_two_hydra_modes_at_once(tmp_path, monkeypatch, capsys):
    """`-m ... --cfg job` (Hydra raises a ValueError before any run) is one line, not a traceback."""
    monkeypatch.chdir(tmp_path)
    one_error_line(*robustft(monkeypatch, capsys, "-m", "--cfg=job"), "Only one of", "--cfg job")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_read_only(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the probe meet what a read-only mount returns
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(ro))

        monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    line = one_error_line(*robustft(monkeypatch, capsys, "-m", f"hydra.sweep.dir={ro / 'sweep'}"), "hydra.sweep.dir")
    assert f"cannot write {ro}" in line
    assert list(ro.iterdir()) == []


def test_output_dir_on_a_full_disk(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(1 << 30, 1 << 30, 0))
    line = one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={tmp_path / 'run'}"), "full")
    assert str(tmp_path / "run") in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["run_info", "checkpoint"])
def test_disk_fills_during_the_run(where, tmp_path, monkeypatch, capsys):
    """ENOSPC from robustft's own writes (run_info.json at start, a checkpoint mid-training) names the path."""
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    target = "robustft.rundir.write_json" if where == "run_info" else "robustft.checkpoint.save_checkpoint"
    monkeypatch.setattr(target, full)
    run = tmp_path / "run"
    line = one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}"), "No space left", "hydra.run.dir")
    assert str(run) in line
    assert "completed" not in statuses(run)
    if where == "checkpoint":
        assert statuses(run) == ["failed"]


# ---------------------------------------------------------------- runtime: a failed run dir, one line


def test_bf16_without_support(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    run = tmp_path / "run"
    one_error_line(*robustft(monkeypatch, capsys, "trainer.precision=bf16", "trainer.device=cpu", f"hydra.run.dir={run}"),
                   "trainer.precision=bf16", "auto", "fp32")
    assert statuses(run) == ["failed"]


def test_binary_train_file(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    folder = data / "glue" / "SST-2"
    folder.mkdir(parents=True)
    shutil.copy(DATA_DIR / "glue" / "SST-2" / "dev.tsv", folder / "dev.tsv")
    (folder / "train.tsv").write_bytes(bytes(range(256)) * 8)
    run = tmp_path / "run"
    one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}", data_dir=data),
                   str(folder / "train.tsv"), "UTF-8")
    assert statuses(run) == ["failed"]


def test_long_header_is_quoted_short(tmp_path, monkeypatch, capsys):
    """A 2 MB single-line train.tsv: the error quotes ~200 characters of its "header", here and in run_info."""
    data = tmp_path / "data"
    folder = data / "glue" / "SST-2"
    folder.mkdir(parents=True)
    shutil.copy(DATA_DIR / "glue" / "SST-2" / "dev.tsv", folder / "dev.tsv")
    (folder / "train.tsv").write_text("word " * 400_000)
    run = tmp_path / "run"
    line = one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}", data_dir=data),
                          str(folder / "train.tsv"), "header", " characters)")
    assert len(line) < 600, len(line)
    (info,) = [json.loads(p.read_text()) for p in run.rglob("run_info.json")]
    assert info["status"] == "failed" and len(info["error"]) < 600


def test_emptied_recipe_evaluators_run_without_evaluators(tmp_path, monkeypatch, capsys):
    """`experiment=quickstart 'robustness=[]'`: the recipe's textfooler options outlive the emptied list
    (omegaconf's `Missing key robustness.textfooler.check` before); the run trains and scores without them."""
    run = tmp_path / "run"
    code, err = robustft(monkeypatch, capsys, "experiment=quickstart", "robustness=[]", f"hydra.run.dir={run}")
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert statuses(run) == ["completed"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "validation/accuracy" in metrics and not any(k.startswith(("textfooler/", "advglue/")) for k in metrics)


@pytest.mark.parametrize("key, bad, good, words", [
    ("trainer.max_length", 2, 32, ["trainer.max_length=2"]),  # found inside the job (the tokenizer's needs)
    ("trainer.lr", -1e-3, 1e-3, ["trainer.lr=-0.001", ">= 0"]),  # a value robustft.validate rejects
])
def test_sweep_runs_the_other_jobs_past_a_bad_one(key, bad, good, words, tmp_path, monkeypatch, capsys):
    """A bad value fails its own job with one line (status failed); the sweep's other jobs run; exit 2."""
    sweep = tmp_path / "sweep"
    line = one_error_line(*robustft(monkeypatch, capsys, "-m", "hydra/launcher=basic", f"{key}={bad},{good}",
                                    f"hydra.sweep.dir={sweep}"), *words)
    infos = {OmegaConf.select(OmegaConf.load(p.parent / ".hydra" / "config.yaml"), key): json.loads(p.read_text())
             for p in sweep.rglob("run_info.json")}
    assert infos[bad]["status"] == "failed" and infos[bad]["error"] == line.removeprefix("robustft: error: ")
    assert infos[good]["status"] == "completed" and len(infos) == 2


# ---------------------------------------------------------------- checkpoints: safetensors only, and sound


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    from robustft.checkpoint import save_checkpoint
    from robustft.models import load_model, load_tokenizer

    cfg = make_cfg(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(path, load_model(cfg.model, cfg.task), load_tokenizer(cfg.model), None)
    return path


def damaged_copy(good: Path, root: Path, damage: str) -> Path:
    ckpt = root / "ckpt"
    shutil.copytree(good, ckpt)
    weights = ckpt / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    if damage == "garbage":
        weights.write_bytes(bytes(range(256)) * 64)
    elif damage == "truncated":
        weights.write_bytes(blob[: len(blob) // 2])
    elif damage in ("flipped", "flipped_finite"):
        (n,) = struct.unpack("<Q", blob[:8])
        start = 8 + n + json.loads(blob[8 : 8 + n])["classifier.weight"]["data_offsets"][0]
        if damage == "flipped":  # all bits of classifier.weight's first floats set: NaN, file still valid
            blob[start : start + 16] = b"\xff" * 16
            (ckpt / "checksums.sha256").unlink()  # as another tool's checkpoint: no sha256 record
        else:  # one bit of a float's mantissa: a finite value only robustft's sha256 record catches
            blob[start] ^= 1
        weights.write_bytes(bytes(blob))
    elif damage == "pickle_only":
        state = {k: torch.zeros(1) for k in ("classifier.weight",)}
        weights.unlink()
        torch.save(state, ckpt / "pytorch_model.bin")
        (ckpt / "training_state.safetensors").write_bytes(b"")
    return ckpt


CKPT_CASES = {
    "garbage": ["model.safetensors", "corrupt or truncated"],
    "truncated": ["model.safetensors", "corrupt or truncated"],
    "flipped": ["classifier.weight", "NaN or inf"],
    "flipped_finite": ["model.safetensors", "differs from what robustft saved", "sha256"],
    "pickle_only": ["pytorch_model.bin", "pickle", "model.safetensors"],
}


@pytest.mark.parametrize("train", ["false", "true"], ids=["eval", "init"])
@pytest.mark.parametrize("damage", CKPT_CASES)
def test_bad_checkpoint(damage, train, good_ckpt, tmp_path, monkeypatch, capsys):
    ckpt = damaged_copy(good_ckpt, tmp_path, damage)
    run = tmp_path / "run"
    code, err = robustft(monkeypatch, capsys, f"train={train}", f"ckpt_path={ckpt}", f"hydra.run.dir={run}")
    line = one_error_line(code, err, *CKPT_CASES[damage])
    if damage != "pickle_only":
        assert str(ckpt) in line  # names the file (or folder) to replace
    assert statuses(run) == ["failed"]


def test_good_checkpoint_still_loads(good_ckpt, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, err = robustft(monkeypatch, capsys, "train=false", f"ckpt_path={good_ckpt}", f"hydra.run.dir={run}")
    assert code == 0 and err == "", err[-3000:]
    assert statuses(run) == ["completed"]


# ---------------------------------------------------------------- command-line parsing: the quoting that works


def test_path_with_equals_signs_gets_the_quoting_hint(good_ckpt, tmp_path, monkeypatch, capsys):
    """A sweep's run folder (`.../trainer.epochs=1/seed=1`) as ckpt_path: Hydra's grammar rejects it unquoted;
    the line shows `"ckpt_path='...'"`, and that quoting evaluates the checkpoint."""
    ckpt = tmp_path / "sweep" / "trainer.epochs=1" / "seed=1"
    shutil.copytree(good_ckpt, ckpt)
    run = tmp_path / "run"
    line = one_error_line(*robustft(monkeypatch, capsys, "train=false", f"ckpt_path={ckpt}", f"hydra.run.dir={run}"),
                          "cannot parse override", f"\"ckpt_path='{ckpt}'\"")
    assert not run.exists(), line
    code, err = robustft(monkeypatch, capsys, "train=false", f"ckpt_path='{ckpt}'", f"hydra.run.dir={run}")
    assert code == 0 and err == "", err[-3000:]
    assert statuses(run) == ["completed"]


def test_run_dir_with_accents_and_symbols(tmp_path, monkeypatch, capsys):
    """Hydra's multi-line lexer error (exit 1) before; now one line with the quoting, and the quoted dir runs."""
    run = tmp_path / "résumé € (1)"
    one_error_line(*robustft(monkeypatch, capsys, f"hydra.run.dir={run}"), f"\"hydra.run.dir='{run}'\"")
    assert not run.exists()
    code, err = robustft(monkeypatch, capsys, f"hydra.run.dir='{run}'")
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert statuses(run) == ["completed"]


# ---------------------------------------------------------------- offline: one line at once, no hub retries


@pytest.mark.parametrize("args, words", [
    (["model=bert_base"], ["bert-base-uncased", "not in the local Hugging Face cache", "model=minilm"]),
    (["data_dir=null"], ["nyu-mll/glue", "offline", "data_dir="]),
])
def test_offline_hub_loads_fail_in_one_line(args, words, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE (set for the tests): an uncached hub model or dataset is one line, run `failed`
    (53 s and 29 s of retries when the hub was only unreachable: robustft/hub.py, tests/test_hub_offline.py)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ROBUSTFT_DATA_DIR", raising=False)
    run = tmp_path / "run"
    code, err = robustft(monkeypatch, capsys, *args, f"hydra.run.dir={run}")  # after the helper's data_dir
    one_error_line(code, err, *words)
    assert statuses(run) == ["failed"]


def test_evaluation_only_run_logs_progress_and_fills_n(good_ckpt, tmp_path, monkeypatch, capsys):
    """`train=false` off a terminal: a line per split scored and per evaluator (silent for 91 s before), and the
    summary's `n` of the clean split filled (it was blank: n_eval was recorded only by training)."""
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["robustft", *TINY, f"data_dir={DATA_DIR}", "train=false", f"ckpt_path={good_ckpt}",
                                      "robustness=[typo]", "robustness.typo.num_examples=4", f"hydra.run.dir={run}"])
    cli.main()
    out = capsys.readouterr().out
    log = (run / "robustft.log").read_text()  # Hydra's log file: the lines a run off a terminal shows
    for line in ("scoring validation (16 examples)", "validation: accuracy=", "robustness 1/1: typo",
                 "robustness typo done in"):
        assert line in log, log
    row = next(line for line in out.splitlines() if "clean validation accuracy" in line)
    assert "│ 16 │" in row, out
