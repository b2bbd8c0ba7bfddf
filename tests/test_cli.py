"""The `robustft` console script: config composition, --help, one-line errors, sweeps and resume.

Each CLI subprocess pays ~8 s of imports, so the checks that need one are batched: independent commands
run side by side (`run_all`) and each command is checked in several ways.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from robustft.cli import CONF_DIR
from robustft.errors import Interrupted
from tests.conftest import DATA_DIR, make_cfg, needs_data

GROUPS = ["model", "task", "method", "trainer"]
HYDRA_CONF = OmegaConf.load(CONF_DIR / "hydra" / "default.yaml")
EXCLUDED = set(HYDRA_CONF.job.config.override_dirname.exclude_keys)
_script = Path(sys.executable).with_name("robustft")
ROBUSTFT = str(_script) if _script.is_file() else shutil.which("robustft") or "robustft"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def app_groups() -> list[str]:
    """Every top-level config group with at least one option (hydra/ is Hydra's own)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and options(p.name))


# ---------------------------------------------------------------- composition (in-process, fast)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = make_cfg([f"{group}={option}"])  # make_cfg resolves every interpolation, so a bad one fails here
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = compose("config", overrides=[f"{group}={option}"], return_hydra_config=True)
    assert full.hydra.runtime.choices[group] == option
    if group == "model":
        m = cfg.model
        assert m.name == option and isinstance(m.pretrained, str) and m.pretrained
        assert isinstance(m.lr, float) and 0 < m.lr < 1
        assert isinstance(m.batch_size, int) and m.batch_size > 0
        assert m.attn_implementation in ("sdpa", "eager", None)  # None: not a transformer
        # the trainer follows the model's tuned lr and batch size unless overridden
        assert (cfg.trainer.lr, cfg.trainer.batch_size) == (m.lr, m.batch_size)
    elif group == "task":
        t = cfg.task
        assert t.name == option and len(t.text_fields) >= 1
        assert t.is_regression == (len(t.label_names) == 0)
        assert "train" in t.local and ("validation" in t.local or t.selection == "carve")
        for split, spec in t.local.items():
            assert spec.file and {"label", *t.text_fields} <= set(spec.columns), (option, split)
        assert t.hub.path and t.hub.train
    elif group == "method":
        assert cfg.method.name == option
        assert cfg.method._target_.startswith("robustft.methods.")
    else:  # trainer: every option is a full trainer (debug extends default)
        default = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")
        assert set(default) <= set(cfg.trainer)
        assert isinstance(cfg.trainer.max_length, int) and cfg.trainer.max_length > 0
        assert cfg.trainer.eval_every == "epoch" or int(cfg.trainer.eval_every) > 0


def test_defaults_and_run_dirs_compose():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["seed=3", "model=tiny_random"], return_hydra_config=True)
    assert cfg.hydra.job.name == "robustft" and cfg.hydra.job.chdir is False
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["run"]["dir"].startswith("outputs/${task.name}/${method.name}/${now:")
    assert raw["sweep"]["dir"].startswith("multirun/${now:")
    assert raw["sweep"]["subdir"] == "${rft_subdir:${hydra.job.override_dirname},${seed}}"
    assert re.fullmatch(r"outputs/sst2/vanilla/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.run.dir)
    assert {"seed", "data_dir", "hydra/launcher"} <= EXCLUDED
    for group in GROUPS:
        assert cfg.hydra.runtime.choices[group] in options(group)


def test_long_override_lists_make_valid_folder_names(tmp_path):
    from robustft.cli import _sweep_subdir

    assert _sweep_subdir("", 3) == "default/seed=3"
    assert _sweep_subdir("model=tiny_random,task=rte", 1) == "model=tiny_random,task=rte/seed=1"
    long = ",".join(f"trainer.option_{i}=value_{i}" for i in range(20))  # ~460 bytes
    a, b = _sweep_subdir(long, 1), _sweep_subdir(long + "x", 1)
    folder, seed = a.split("/")
    assert seed == "seed=1" and len(folder.encode()) <= 255 and folder.startswith(long[:150])
    assert a == _sweep_subdir(long, 1) and folder == _sweep_subdir(long, 2).split("/")[0]  # seeds together
    assert a != b  # the hash keeps configurations apart
    (tmp_path / a).mkdir(parents=True)  # the OS accepts it (a 256+ byte name is ENAMETOOLONG)


# ---------------------------------------------------------------- subprocess helpers


def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("ROBUSTFT_DATA_DIR", None)  # every command names its data_dir
    return env


def run_all(commands: dict[str, list[str]], cwd: Path, timeout: float = 240) -> dict[str, subprocess.CompletedProcess]:
    """Run `robustft <args>` for every entry side by side (imports dominate; 2 CPUs)."""
    procs = {name: subprocess.Popen([ROBUSTFT, *args], cwd=cwd, env=cli_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in commands.items()}
    done = {}
    for name, p in procs.items():
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_all({"one": args}, cwd, timeout)["one"]


def error_line(r: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be the CLI's one-line error (no traceback anywhere)."""
    assert r.returncode != 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("robustft: error: "), r.stderr[-2000:]
    return last


def override_dirname(overrides: list[str]) -> str:
    """hydra.job.override_dirname as configured in conf/hydra/default.yaml (the last value of a key wins)."""
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides if not o.startswith("hydra")}
    return ",".join(sorted(o for key, o in by_key.items() if key not in EXCLUDED))


def info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_info.json").read_text())


# ---------------------------------------------------------------- --help and bad input


def test_help_and_config_mistakes_are_one_line_errors(tmp_path):
    runs = run_all({
        "help": ["--help"],
        "group": ["method=nope", f"hydra.run.dir={tmp_path / 'r_group'}"],
        "key": ["trainer.epochz=3", f"hydra.run.dir={tmp_path / 'r_key'}"],
        "type": ["-m", "seed=1,2", "trainer.epochs=abc", f"hydra.sweep.dir={tmp_path / 'sweep_type'}"],
        "option": ["method=rose", "+method.varaint=second", f"hydra.run.dir={tmp_path / 'r_option'}"],
    }, cwd=tmp_path)

    h = runs["help"]
    assert h.returncode == 0, h.stderr[-2000:]
    assert "== Config groups" in h.stdout and "== Options" in h.stdout
    for group in app_groups():
        assert f"{group}: {', '.join(options(group))}" in h.stdout, group
    for key in ("seed:", "data_dir:", "resume: auto", "trainer:", "max_length:"):
        assert key in h.stdout
    assert "robustft -m hydra/launcher=slurm" in h.stdout  # the footer's examples

    line = error_line(runs["group"])
    assert "unknown method 'nope'" in line and ", ".join(options("method")) in line
    line = error_line(runs["key"])
    assert "unknown option 'trainer.epochz'" in line and "spelling" in line
    line = error_line(runs["option"])  # a method option the class does not take (tests/test_method_options.py)
    assert "unknown option 'method.varaint'" in line and "did you mean 'method.variant'" in line
    line = error_line(runs["type"])  # (in a sweep: fails before any job starts)
    assert "trainer.epochs='abc'" in line and "whole number" in line
    # nothing was created: neither the given run/sweep dirs nor Hydra's default outputs/ multirun/
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def one_line_exit(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("robustft: error: ")
    return err.strip()


def test_preflight_sweeps_globs_and_other_config_dirs(monkeypatch, capsys):
    """The pre-flight in-process: every swept value is checked; glob/interval sweeps are understood."""
    from robustft import cli

    assert "unknown model 'nope'" in one_line_exit(capsys, cli.preflight, ["seed=1,2", "model=tiny_random,nope"])
    assert "'x'" in one_line_exit(capsys, cli.preflight, ["trainer.epochs=1,x"])
    cli.preflight(["model=glob(tiny*)", "seed=range(1,3)", "task=rte,sst2"])
    line = one_line_exit(capsys, cli.preflight, ["model=glob(zzz*)"])
    assert "matches no model option" in line and "tiny_random" in line
    cli.preflight(["trainer.lr=interval(1e-5,1e-3)"])  # only a sweeper plugin can enumerate it
    # another config dir/name: the pre-flight cannot see its groups, so main() leaves it to Hydra
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "preflight", calls.append)
    monkeypatch.setattr(cli, "_hydra_main", lambda: None)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    for argv in (["-cd", "/my/conf", "method=mine"], ["--config-dir=/my/conf", "method=mine"], ["--cfg", "job"]):
        monkeypatch.setattr(sys, "argv", ["robustft", *argv])
        cli.main()
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["robustft", "-m", "seed=1,2", "hydra.sweep.dir=/x"])
    cli.main()
    assert calls == [["seed=1,2", "hydra.sweep.dir=/x"]]


def run_with_fit(tmp_path, monkeypatch, error: BaseException, mode: str = "RUN") -> int:
    """cli.run() in-process with a stand-in robustft.runner whose fit raises `error`; returns the exit code."""
    from hydra.core.hydra_config import HydraConfig

    from robustft import cli

    def fit(cfg, run_dir):
        raise error

    # run() imports robustft.runner lazily: a stand-in module means no torch import for these tests
    monkeypatch.setitem(sys.modules, "robustft.runner", types.SimpleNamespace(fit=fit))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_random"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "job")
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
        cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    sigterm = signal.getsignal(signal.SIGTERM)  # run() installs its own SIGTERM and SIGINT handlers
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(cfg)
    finally:
        HydraConfig.instance().cfg = None
        signal.signal(signal.SIGTERM, sigterm)
        signal.signal(signal.SIGINT, sigint)
    return e.value.code


def test_exit_during_training_marks_the_run_interrupted(tmp_path, monkeypatch):
    """submitit's preemption/timeout handler calls sys.exit before a SLURM requeue: not a failure."""
    assert run_with_fit(tmp_path, monkeypatch, SystemExit(-1)) == -1
    run_info = info(tmp_path / "sweep" / "job")
    assert run_info["status"] == "interrupted" and run_info["error"] == "SystemExit: -1"


def test_interrupted_sweep_job_says_how_to_resume_the_sweep(tmp_path, monkeypatch, capsys):
    """In a sweep hydra.run.dir is ignored: resuming takes the same hydra.sweep.dir."""
    assert run_with_fit(tmp_path, monkeypatch, Interrupted("interrupted at step 3"), mode="MULTIRUN") == 3
    line = capsys.readouterr().err.strip()
    assert line == (f"robustft: error: interrupted at step 3; rerun the same command with "
                    f"hydra.sweep.dir={(tmp_path / 'sweep').resolve()} to resume")
    assert info(tmp_path / "sweep" / "job")["status"] == "interrupted"


# ---------------------------------------------------------------- data problems (fail inside the run)


def sst2_copy(root: Path, extra_train_row: str) -> Path:
    """A small SST-2 folder from the real one, plus one extra train row."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", 41), ("dev.tsv", 21)):
        with open(DATA_DIR / "glue" / "SST-2" / name) as f:
            head = [next(f) for _ in range(n)]
        (folder / name).write_text("".join(head) + (extra_train_row if name == "train.tsv" else ""))
    return root


@needs_data()
def test_data_problems_fail_the_run_with_one_line(tmp_path, tiny_overrides):
    bad_row = sst2_copy(tmp_path / "bad_row", "a fine film\t1\textra\n")
    bad_label = sst2_copy(tmp_path / "bad_label", "a fine film\t7\n")
    # an extra config dir (-cd) with a method of the user's own: the pre-flight must not reject it
    (tmp_path / "myconf" / "method").mkdir(parents=True)
    (tmp_path / "myconf" / "method" / "mine.yaml").write_text("_target_: robustft.methods.vanilla.Vanilla\nname: mine\n")
    base = [*tiny_overrides, f"data_dir={DATA_DIR}"]
    cases = {
        "row": ([*tiny_overrides, f"data_dir={bad_row}"], ["train.tsv:42", "malformed row", "fix or remove"]),
        "label": ([*tiny_overrides, f"data_dir={bad_label}"], ["train.tsv:42", "label '7'", "label set"]),
        "max_length": ([*base, "trainer.max_length=2"], ["trainer.max_length=2", "use at least"]),
        "no_ckpt": (["-cd", str(tmp_path / "myconf"), "method=mine", *base, "train=false"],
                    ["train=false", "ckpt_path="]),
    }
    runs = run_all({name: [*args, f"hydra.run.dir={tmp_path / name}"] for name, (args, _) in cases.items()}, tmp_path)
    for name, (_, words) in cases.items():
        r = runs[name]
        line = error_line(r)
        assert r.returncode == 2, (name, r.stderr[-2000:])
        assert all(w in line for w in words), (name, line)
        run_info = info(tmp_path / name)
        assert run_info["status"] == "failed", name
        assert run_info["error"] == line.removeprefix("robustft: error: ")
        assert not (tmp_path / name / "metrics.json").exists()
    assert info(tmp_path / "no_ckpt")["method"] == "mine"  # the -cd config was used


# ---------------------------------------------------------------- sweeps


@needs_data()
def test_sweep_basic_and_submitit_local(tmp_path, tiny_overrides):
    tiny = [*tiny_overrides, "trainer.max_steps=4", f"data_dir={DATA_DIR}"]
    runs = run_all({
        "basic": ["-m", "seed=1,2", *tiny, f"hydra.sweep.dir={tmp_path / 'basic'}"],
        "local": ["-m", "hydra/launcher=submitit_local", "seed=3", *tiny, f"hydra.sweep.dir={tmp_path / 'local'}"],
    }, tmp_path)
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    subdir = override_dirname(tiny)
    assert "seed" not in subdir and "data_dir" not in subdir

    basic = tmp_path / "basic"
    assert (basic / "multirun.yaml").is_file()
    assert sorted(p.name for p in basic.iterdir()) == sorted([subdir, "multirun.yaml"])
    assert sorted(p.name for p in (basic / subdir).iterdir()) == ["seed=1", "seed=2"]
    for seed in (1, 2):
        run = basic / subdir / f"seed={seed}"
        run_info = info(run)
        assert run_info["status"] == "completed" and run_info["seed"] == seed and run_info["attempts"] == 1
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["train/steps"] == 4 and 0 <= metrics["validation/accuracy"] <= 1
        assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == seed
        assert f"seed={seed}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert info(basic / subdir / "seed=1")["git_sha"] == info(basic / subdir / "seed=2")["git_sha"]

    # submitit_local: the same layout (hydra/launcher is not part of the dir name), one job
    local = tmp_path / "local"
    run = local / subdir / "seed=3"
    assert sorted(p.name for p in (local / subdir).iterdir()) == ["seed=3"]
    assert info(run)["status"] == "completed" and (run / "metrics.json").is_file() and (run / ".hydra").is_dir()
    results = list((local / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 1
    # the job's own log: no progress bars from datasets/transformers in a submitit job either
    job_err = results[0].parent.glob("*_log.err")
    assert not any("Map:" in p.read_text() or "it/s]" in p.read_text() for p in job_err)


# ---------------------------------------------------------------- resume=auto


@needs_data()
def test_interrupted_run_resumes_in_place(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    args = [*tiny_overrides, "+trainer.interrupt_at_step=3", f"data_dir={DATA_DIR}", f"hydra.run.dir={run}"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 3, first.stderr[-2000:]
    line = error_line(first)
    assert "interrupted at step 3" in line and f"hydra.run.dir={run}" in line
    assert info(run)["status"] == "interrupted" and info(run)["attempts"] == 1
    assert (run / "checkpoints" / "last").is_dir()

    second = run_cli(args, tmp_path)  # the same command again
    assert second.returncode == 0, second.stderr[-3000:]
    run_info = info(run)
    assert run_info["status"] == "completed" and run_info["attempts"] == 2
    assert run_info["resumed_from_step"] == 3 and "error" not in run_info  # attempt 1's error is gone
    assert json.loads((run / "metrics.json").read_text())["train/steps"] == 16
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # every step logged exactly once across the two attempts: the run continued, it did not restart
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(2, 17, 2))
    assert [r["step"] for r in rows if r["split"] == "validation"] == [4, 8, 12, 16]
