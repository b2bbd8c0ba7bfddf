"""hydra/sweeper=optuna (robustft/tune/): grammar, budgets, resume, reproducibility, shared journal storage.

Most tests drive the search with a stand-in launcher (tests/tune_helpers.py) that writes each trial's
records without training; test_cli_search_* run the real command on tiny_random.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from robustft.errors import UserError
from robustft.tune import space as sp
from robustft.tune import study as st
from robustft.tune import sweep as tune
from tests.conftest import DATA_DIR, needs_data
from tests.tune_helpers import compose, fake_launch, options, run_search, score, worker

CONF = Path(__file__).resolve().parent.parent / "robustft" / "conf"


def trials_of(cells: list) -> dict[str, list]:
    return {c.label: c.study.get_trials(deepcopy=False) for c in cells}


def test_grammar_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, grid, fixed = sp.classify(["arm=a,b", "seed=1,2", "trainer.lr=tag(log,interval(1e-5,1e-3))",
                                      "method.p=choice(0.7,0.9)", "method.k=range(2,5)", "model=tiny_random",
                                      "search.method.x=int(interval(1,4))", "search.method.y='interval(0.5, 1.5)'"])
    assert space == {"trainer.lr": FloatDistribution(1e-5, 1e-3, log=True), "method.p": CategoricalDistribution((0.7, 0.9)),
                     "method.k": IntDistribution(2, 4), "method.x": IntDistribution(1, 4),
                     "method.y": FloatDistribution(0.5, 1.5)}
    assert grid == {"arm": ["a", "b"], "seed": ["1", "2"]} and fixed == {"model": "model=tiny_random"}
    assert sp.parse("k", "range(30, 91, 10)") == IntDistribution(30, 90, step=10)
    assert sp.format_value(1e-4) == "0.0001" and sp.format_value("trials/arm=a/000") == "'trials/arm=a/000'"


@pytest.mark.parametrize("text, words", [
    ("interval(3, 1)", "low >= high"), ("tag(log, interval(0, 1))", "needs low > 0"),
    ("choice(1, 1)", "repeats a value"), ("0.5", "not a range"), ("range(5, 1)", "is empty"),
    ("interval(1, ", "cannot parse"),
])
def test_bad_ranges_are_one_line_user_errors(text, words):
    with pytest.raises(UserError) as e:
        sp.parse("trainer.lr", text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_every_search_space_composes_and_names_real_options():
    """Each conf/search/method/<m>.yaml parses and ranges keys its method (or the trainer) really has."""
    methods = sorted(p.stem for p in (CONF / "search" / "method").glob("*.yaml"))
    assert {"vanilla", "r3f", "mixout", "lora", "rec_adam", "rose", "freelb", "r_drop", "smart"} <= set(methods)
    o = options()
    for m in methods:
        (cell,), _, _ = tune.plan(o, [f"method={m}"], compose)
        assert cell.space and all(k.startswith(("trainer.", "method.")) for k in cell.space), m
    (cell,), _, _ = tune.plan(o, ["selector=child_tuning"], compose)
    assert set(cell.space) == {"trainer.lr", "selector.reserve_p"}
    (cell,), _, _ = tune.plan(o, ["method=r3f", "search.trainer.lr=tag(log,interval(1e-4,1e-2))"], compose)
    assert cell.space["trainer.lr"].low == 1e-4  # a range overridden from the command line
    (cell,), _, _ = tune.plan(o, ["method=r3f", "~search.method.noise_type"], compose)
    assert set(cell.space) == {"trainer.lr", "method.r3f_lambda"}  # a dimension removed
    with pytest.raises(UserError, match="not an option"):
        tune.plan(o, ["method=r3f", "search.method.lambda=interval(0.1,1)"], compose)
    with pytest.raises(UserError, match="both searched and set"):
        tune.plan(o, ["trainer.lr=0.1", "search.trainer.lr=interval(0.1,1)"], compose)


def test_the_command_line_replaces_a_key_of_the_sweeper_params():
    """As in Hydra's BasicSweeper: `arm=pgd` on the command line runs that arm of a recipe whose params list
    several. It used to be added beside the recipe's list: a final stage asked for every arm's study, and a
    search would have trained that arm in every study."""
    o = options(params={"method": "vanilla,r3f", "seed": "1,2,3", "trainer.epochs": "2"})
    cells, fixed, seeds = tune.plan(o, [], compose)
    assert [c.label for c in cells] == ["method=vanilla", "method=r3f"] and seeds == ["1", "2", "3"]
    assert fixed == ["trainer.epochs=2"]
    cells, fixed, seeds = tune.plan(o, ["method=r3f", "seed=4,5", "trainer.epochs=3"], compose)
    assert [c.label for c in cells] == ["method=r3f"] and seeds == ["4", "5"]  # the search's study of r3f
    assert fixed == ["trainer.epochs=3"] and "method.r3f_lambda" in cells[0].space
    cells, _, seeds = tune.plan(o, ["seed=7"], compose)
    assert len(cells) == 2 and seeds == ["7"]
    cells, _, _ = tune.plan(o, ["method=r3f,vanilla"], compose)
    assert [c.label for c in cells] == ["method=r3f", "method=vanilla"]


def test_equal_interleaved_budget_and_the_seed_reproduces_the_sequence(tmp_path):
    order: list = []
    o, cells = run_search(tmp_path / "a", ["method=vanilla,r_drop"], launch=fake_launch(tmp_path / "a", log=order),
                          n_trials=3, n_jobs=2)
    assert [Path(d).parent.name for d, _ in order] == ["method=vanilla", "method=r_drop"] * 3  # balanced when stopped
    by_cell = trials_of(cells)
    assert all(len(t) == 3 and {x.state for x in t} == {TrialState.COMPLETE} for t in by_cell.values())
    for trials in by_cell.values():  # the objective is the validation score of the trial's own parameters
        for t in trials:
            assert t.value == score({k: str(v) for k, v in t.params.items()}) and t.user_attrs["rft_metric"] == "validation/accuracy"
    again: list = []
    run_search(tmp_path / "b", ["method=vanilla,r_drop"], launch=fake_launch(tmp_path / "b", log=again), n_trials=3, n_jobs=2)
    assert [p for _, p in again] == [p for _, p in order]
    other: list = []
    run_search(tmp_path / "c", ["method=vanilla"], launch=fake_launch(tmp_path / "c", log=other), n_trials=2, seed=7)
    assert other[0][1] != order[0][1]


def test_resumed_search_continues_the_same_sequence(tmp_path):
    """Stopped after 2 of 4 trials and rerun: the same 4 trials as an uninterrupted search, none repeated."""
    full: list = []
    run_search(tmp_path / "full", ["method=r_drop"], launch=fake_launch(tmp_path / "full", log=full), n_trials=4)
    parts: list = []
    run_search(tmp_path / "r", ["method=r_drop"], launch=fake_launch(tmp_path / "r", log=parts), n_trials=2)
    _, cells = run_search(tmp_path / "r", ["method=r_drop"], launch=fake_launch(tmp_path / "r", log=parts), n_trials=4)
    assert parts == [(d.replace("full", "r"), p) for d, p in full]
    assert [t.number for t in cells[0].study.trials] == [0, 1, 2, 3]


def test_a_trial_running_when_its_worker_died_is_requeued_not_lost_or_repeated(tmp_path):
    """A killed sweeper leaves its trial RUNNING: the next run fails it and re-queues its parameters into
    the same run folder (the run resumes from its checkpoint); the budget counts it once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    o = options(n_trials=3)
    cells, _, _ = tune.plan(o, ["method=vanilla"], compose)
    tune.open_studies(o, cells, tmp_path)
    study = cells[0].study
    killed = study.ask({"trainer.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    for key, value in ((st.WORKER, f"{socket.gethostname()}:{dead.pid}"), (st.RUN_DIR, "trials/method=vanilla/000")):
        killed.set_user_attr(key, value)
    ran: list = []
    run_search(tmp_path, ["method=vanilla"], launch=fake_launch(tmp_path, log=ran), n_trials=3)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[st.RETRIED]
    counted = st.counted(trials)
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 3
    assert counted[0].params == trials[0].params and counted[0].user_attrs["rft_retry_of"] == 0
    assert ran[0][0] == "trials/method=vanilla/000"  # the killed trial's own folder
    assert len({t.user_attrs[st.RUN_DIR] for t in counted}) == 3


def test_a_failed_run_is_told_fail_and_the_search_goes_on(tmp_path):
    _, (cell,) = run_search(tmp_path, ["method=vanilla"], n_trials=3,
                            launch=fake_launch(tmp_path, fail_if=lambda p, d: d.endswith("001")))
    states = [t.state for t in cell.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "must be >= 0" in cell.study.trials[1].user_attrs["rft_error"]


def test_objective_reads_the_selection_split_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"status": "completed", "main_metric": "validation/accuracy"}))
    (run / "metrics.json").write_text(json.dumps({"validation/accuracy": 0.7, "test/accuracy": 0.9}))
    assert tune.objective(run, "validation") == ("COMPLETE", 0.7, "validation/accuracy")
    (run / "run_info.json").write_text(json.dumps({"status": "completed", "main_metric": "test/accuracy"}))
    with pytest.raises(UserError, match="held-out"):
        tune.objective(run, "validation")
    with pytest.raises(UserError, match="held-out split"):
        tune.check_options(options(objective_split="test"))


def test_two_workers_share_one_journal_study_without_duplicates(tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(str(tmp_path), storage, str(tmp_path / f"ready{i}"), 6)) for i in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    storage_obj, _ = st.make_storage(storage, tmp_path)
    trials = optuna.load_study(study_name="t/default", storage=storage_obj).get_trials(deepcopy=False)
    done = st.counted(trials)
    assert len(done) == 6 and {t.state for t in done} == {TrialState.COMPLETE}
    assert len({t.user_attrs[st.RUN_DIR] for t in done}) == 6
    assert len({tuple(sorted(t.params.items())) for t in done}) == 6  # no two trials drew the same values
    assert len({t.user_attrs[st.WORKER] for t in done}) == 2  # both workers ran trials
    assert all(t.user_attrs.get(st.SURPLUS) for t in trials if t not in done)


# ---------------------------------------------------------------- the real command on tiny_random

TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=32", "task.max_eval_samples=16", "trainer=debug",
        "trainer.max_steps=2", f"data_dir={DATA_DIR}"]


def test_cli_bad_range_is_one_line_and_creates_nothing(tmp_path):
    from tests.test_cli import error_line, run_cli

    r = run_cli(["-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={tmp_path / 's'}", "search.trainer.lr=tag(log,interval(0,1))",
                 *TINY], tmp_path)
    assert r.returncode == 2 and "log-scaled but starts at 0" in error_line(r)
    assert not (tmp_path / "s").exists()


@needs_data()
@pytest.mark.slow  # ~30 s: two trainings and Hydra start-up
def test_cli_search_runs_trials_whose_objective_is_the_validation_score(tmp_path):
    from tests.test_cli import run_cli

    sweep = tmp_path / "s"
    r = run_cli(["-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", *TINY], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="robustft/default", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        run = sweep / t.user_attrs[st.RUN_DIR]
        info, metrics = (json.loads((run / f).read_text()) for f in ("run_info.json", "metrics.json"))
        assert info["main_metric"] == "validation/accuracy" and t.value == metrics["validation/accuracy"]
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        assert f"trainer.lr={t.params['trainer.lr']!r}" in overrides  # the run trained with the sampled value


def test_nothing_a_job_runs_can_sample():
    """Only the sweeper process samples: no module a job (any rank of a data-parallel trial) runs imports
    robustft.tune or optuna, so every rank trains with the overrides it was given."""
    from tests.test_architecture import import_graph

    graph = import_graph()
    users = {m for m, deps in graph.items() if any(d.startswith("robustft.tune") for d in deps)}
    assert users <= {m for m in graph if m.startswith("robustft.tune")}, users
    root = Path(__file__).resolve().parent.parent / "robustft"
    outside = [p for p in root.rglob("*.py") if "tune" not in p.parts and "import optuna" in p.read_text()]
    assert outside == []


@needs_data()
@pytest.mark.slow  # ~2 min: a killed search resumed, the final seeds and the report on tiny_random
def test_cli_killed_search_resumes_then_final_seeds_and_report(tmp_path):
    import signal
    import time

    from tests.test_cli import ROBUSTFT, cli_env, run_cli

    sweep = tmp_path / "s"
    args = ["-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=3",
            "method=vanilla,r_drop", *TINY]
    p = subprocess.Popen([ROBUSTFT, *args], cwd=tmp_path, env=cli_env(), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = sweep / "trials" / "method=vanilla" / "001" / "run_info.json"  # the third trial (interleaved)
    deadline = time.time() + 240
    while not started.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert started.is_file()
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    for arm in ("vanilla", "r_drop"):
        trials = optuna.load_study(study_name=f"robustft/method={arm}", storage=storage).trials
        done = st.counted(trials)
        assert [t.state for t in done] == [TrialState.COMPLETE] * 3, arm
        assert len({t.user_attrs[st.RUN_DIR] for t in done}) == 3
    killed = [t for t in optuna.load_study(study_name="robustft/method=vanilla", storage=storage).trials
              if t.user_attrs.get(st.RETRIED)]
    assert len(killed) == 1 and killed[0].number == 1  # re-queued once, into its own folder
    r = run_cli([*args, "hydra.sweeper.stage=final", "seed=1,2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    best = optuna.load_study(study_name="robustft/method=r_drop", storage=storage).best_trial
    for seed in (1, 2):
        run = sweep / "final" / "method=r_drop" / f"seed={seed}"
        info = json.loads((run / "run_info.json").read_text())
        assert info["status"] == "completed" and info["seed"] == seed
        assert info["tuned_from"]["trial"] == best.number and info["tuned_from"]["study"] == "robustft/method=r_drop"
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        assert f"method.alpha={best.params['method.alpha']}" in overrides
    r = subprocess.run([sys.executable, "-m", "robustft.report.cli", str(sweep), "--out", str(tmp_path / "rep")],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    section = (tmp_path / "rep" / "report.md").read_text()
    assert "| method=vanilla | vanilla | 3 | 0 |" in section and "| method=r_drop | r_drop | 3 | 0 |" in section


@needs_data()
@pytest.mark.slow  # ~1-2 min: a 2-task SLURM job (stand-in sbatch/srun) as one data-parallel trial
def test_two_rank_slurm_trial_gets_one_parameter_set(tmp_path):
    """The sweeper samples once; the trial's job is one submission whose two tasks (ranks) run the same
    overrides as one data-parallel run (world size 2) whose score the study records."""
    from submitit.core.utils import DelayedSubmission

    from tests.ddp_helpers import free_port
    from tests.test_cli import ROBUSTFT
    from tests.test_slurm import ARRAY_ID, MULTI_TASK_SRUN, fake_slurm, wait_for

    fake, work = tmp_path / "slurm", tmp_path / "work"
    env = fake_slurm(fake)
    (fake / "bin" / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> "$FAKE_SLURM/calls.log"\n{MULTI_TASK_SRUN}')
    work.mkdir()
    sweep, log = work / "s", tmp_path / "robustft.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([ROBUSTFT, "-m", "hydra/sweeper=optuna", "hydra/launcher=slurm",
                                   "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=1",
                                   "method=r_drop", *TINY], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    node_env = dict(env, SLURM_JOB_ID=str(ARRAY_ID), SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
                    SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    try:
        wait_for(lambda: len(list(sweep.glob(".submitit/*/*_submitted.pkl"))) == 1, driver, log, timeout=240)
        (pkl,) = sweep.glob(".submitit/*/*_submitted.pkl")
        job_overrides = DelayedSubmission.load(pkl).args[0]  # the one job both tasks unpickle
        (fake / "states").write_text(f"{ARRAY_ID}|RUNNING|localhost\n")
        assert subprocess.run(["bash", str(fake / "sbatch_0.sh")], cwd=work, env=node_env, timeout=600).returncode == 0
        (fake / "states").write_text(f"{ARRAY_ID}|COMPLETED|localhost\n")
        assert driver.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    (t,) = optuna.load_study(study_name="robustft/default", storage=f"sqlite:///{sweep / 'optuna.db'}").trials
    assert t.state == TrialState.COMPLETE
    run = sweep / t.user_attrs[st.RUN_DIR]
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and t.value == json.loads((run / "metrics.json").read_text())["validation/accuracy"]
    sampled = [f"{k}={sp.format_value(v)}" for k, v in t.params.items()]
    assert set(sampled) <= set(job_overrides)  # one parameter set, given to the job (all its ranks)
    assert set(sampled) <= set((run / ".hydra" / "overrides.yaml").read_text().replace("- ", "").splitlines())


def test_after_a_launcher_error_the_batch_runs_still_going_are_awaited(tmp_path):
    """submitit raises at a batch's first failed job: a trial still running (fresh files) is awaited, one
    whose files went quiet for grace_s (a dead job) is not."""
    import threading
    import time

    live, dead = tmp_path / "live", tmp_path / "dead"
    for run in (live, dead):
        run.mkdir()
        (run / "run_info.json").write_text(json.dumps({"status": "running"}))
    old = time.time() - 100
    os.utime(dead / "run_info.json", (old, old))

    def finish() -> None:
        time.sleep(0.5)
        (live / "run_info.json").write_text(json.dumps({"status": "completed"}))

    threading.Thread(target=finish).start()
    start = time.time()
    tune.settle([live, dead], quiet_s=30, poll_s=0.1)
    assert 0.4 < time.time() - start < 10


def test_a_recipe_states_the_budget_per_arm():
    """hydra.sweeper.n_trials defaults to the recipe's tuning.trials (12 without a recipe)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides, n in ((["experiment=baselines_sst2_minilm"], 12), (["experiment=rose_emnlp22_minilm", "tuning.trials=5"], 5),
                             ([], 12)):
            cfg = hydra_compose("config", overrides=[*overrides, "hydra/sweeper=optuna"], return_hydra_config=True)
            assert cfg.hydra.sweeper.n_trials == n
