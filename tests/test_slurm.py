"""`robustft -m hydra/launcher=slurm` without a cluster: stand-in sbatch/srun/sacct/scancel/squeue/scontrol.

The fake sbatch keeps the script submitit renders and prints a job id; the test then plays the compute
node: it runs that script for each array task (the fake srun runs the command in place), and emulates a
preemption requeue the way submitit's USR2 handler does it (`launcher.checkpoint(...)` re-dumped as the
task's pickle, then the same task runs again later), which must land in the same run directory.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from robustft.cli import CONF_DIR
from tests.conftest import DATA_DIR, needs_data
from tests.test_cli import ROBUSTFT, cli_env, info, override_dirname

SLURM_CONF = OmegaConf.load(CONF_DIR / "hydra" / "launcher" / "slurm.yaml")
ARRAY_ID = 12345
# srun's options the stand-ins read (--output/--error); the command follows them
SRUN_OPTIONS = """
out=; err=
while [ $# -gt 0 ]; do
  case "$1" in
    --output) out=$2; shift 2 ;;
    --error) err=$2; shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
"""


FAKE_TOOLS = {
    "sbatch": """
n=$(ls "$FAKE_SLURM"/sbatch_*.sh 2>/dev/null | wc -l)
cp "$1" "$FAKE_SLURM/sbatch_$n.sh"
echo "Submitted batch job $((12345 + n))"
""",
    # srun [options] command...: one task on this "node"; --output/--error patterns as SLURM expands them
    "srun": SRUN_OPTIONS + """expand() { local s=$1; s=${s//%A/$SLURM_ARRAY_JOB_ID}; s=${s//%a/$SLURM_ARRAY_TASK_ID}; s=${s//%j/$SLURM_JOB_ID}; echo "${s//%t/0}"; }
[ -n "$out" ] && exec >>"$(expand "$out")"
[ -n "$err" ] && exec 2>>"$(expand "$err")"
exec "$@"
""",
    # the states the test writes ("12345_0|RUNNING|node1" lines); none yet = unknown = still waiting
    "sacct": """
echo "JobID|State|NodeList"
cat "$FAKE_SLURM/states" 2>/dev/null || true
""",
    # a roomy node, so that the pre-flight's partition check (robustft.slurm.check_request) passes
    "sinfo": 'echo "debug*|64|256000|gpu:8"',
    "scancel": "",
    "squeue": 'echo "JOBID PARTITION NAME USER ST TIME NODES NODELIST(REASON)"',
    "scontrol": "",
}


def fake_slurm(root: Path) -> dict[str, str]:
    """Write the stand-ins to root/bin (each logs its call) and return an environment that finds them."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in FAKE_TOOLS.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE_SLURM/calls.log"\n{body.lstrip()}')
        path.chmod(0o755)
    env = cli_env()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM=str(root))
    return env


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"robustft exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the submission:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.robustft_slurm.launcher.SlurmLauncher"  # the plugin's, reporting failed jobs in one line
    for key, value in SLURM_CONF.items():  # slurm.yaml's own values win over submitit_slurm's defaults
        if key != "defaults":
            assert launcher[key] == value, key
    assert launcher.max_num_timeout > 0  # requeue on timeout is on: runs resume (resume=auto)
    assert OmegaConf.to_container(launcher, resolve=False)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


@needs_data()
def test_slurm_array_job_script_run_and_requeue(tmp_path, tiny_overrides):
    from submitit.core.utils import DelayedSubmission, pickle_load

    env = fake_slurm(tmp_path / "slurm")
    fake = tmp_path / "slurm"
    work = tmp_path / "work"  # the submission dir; the default sweep dir multirun/${now:...} is relative to it
    work.mkdir()
    overrides = [*tiny_overrides, "trainer.max_steps=2", f"data_dir={DATA_DIR}"]
    log = tmp_path / "robustft.log"
    procs: list[subprocess.Popen] = []  # everything this test starts, killed if still running at the end
    with open(log, "w") as out:
        driver = subprocess.Popen([ROBUSTFT, "-m", "hydra/launcher=slurm", "hydra.launcher.array_parallelism=1",
                                   "seed=1,2", *overrides], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    procs.append(driver)

    def node(task: int) -> subprocess.Popen:
        """Array task `task` on the compute node: the sbatch script with SLURM's environment."""
        node_env = dict(env, SLURM_JOB_ID=str(ARRAY_ID + 1 + task), SLURM_ARRAY_JOB_ID=str(ARRAY_ID),
                        SLURM_ARRAY_TASK_ID=str(task), SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                        SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node1")
        procs.append(subprocess.Popen(["bash", str(fake / "sbatch_0.sh")], cwd=work, env=node_env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs[-1]

    try:
        # ---- submission: one sbatch call, two pickled jobs
        wait_for(lambda: len(list(work.glob("multirun/*/.submitit/*/*_submitted.pkl"))) == 2, driver, log)
        (sweep,) = list((work / "multirun").iterdir())
        sweep = sweep.resolve()
        assert [p.name for p in fake.glob("sbatch_*.sh")] == ["sbatch_0.sh"]
        script = (fake / "sbatch_0.sh").read_text()
        flags = dict(line[len("#SBATCH --"):].partition("=")[::2] for line in script.splitlines()
                     if line.startswith("#SBATCH --"))
        assert flags["array"] == "0-1%1"  # 2 jobs, at most array_parallelism at a time
        assert flags["time"] == str(SLURM_CONF.timeout_min)
        assert flags["cpus-per-task"] == str(SLURM_CONF.cpus_per_task)
        assert flags["mem"] == f"{SLURM_CONF.mem_gb}GB"
        assert flags["gpus-per-node"] == str(SLURM_CONF.gpus_per_node)
        assert flags["ntasks-per-node"] == "1" and flags["nodes"] == "1"
        assert flags["job-name"] == "robustft"
        assert flags["signal"] == "USR2@120"  # submitit checkpoints + requeues on USR2, 120 s before the limit
        assert flags["open-mode"] == "append"  # a requeued task appends to its logs
        assert "#SBATCH --requeue" in script.splitlines()  # allowed even where JobRequeue=0
        assert "partition" not in flags  # partition: null
        assert flags["output"] == f"{sweep}/.submitit/%A_%a/%A_%a_0_log.out"
        assert flags["error"] == f"{sweep}/.submitit/%A_%a/%A_%a_0_log.err"
        assert "export SUBMITIT_EXECUTOR=slurm" in script.splitlines()
        (command,) = [line for line in script.splitlines() if line.startswith("srun ")]
        assert command.endswith(" -u -m submitit.core._submit " + shlex.quote(f"{sweep}/.submitit/%j"))

        jobs = {}
        for task, seed in ((0, 1), (1, 2)):
            pkl = sweep / ".submitit" / f"{ARRAY_ID}_{task}" / f"{ARRAY_ID}_{task}_submitted.pkl"
            delayed = DelayedSubmission.load(pkl)
            assert type(delayed.function).__module__ == "hydra_plugins.robustft_slurm.launcher" and hasattr(delayed.function, "checkpoint")
            job_overrides, dir_key, job_num = delayed.args[:3]
            assert f"seed={seed}" in job_overrides and dir_key == "hydra.sweep.dir" and job_num == task
            assert delayed._timeout_min == SLURM_CONF.timeout_min
            assert delayed._timeout_countdown == SLURM_CONF.max_num_timeout  # requeues left after timeouts
            jobs[task] = pkl

        # ---- the compute node runs both array tasks (the fake srun runs the command in place)
        (fake / "states").write_text(f"{ARRAY_ID}_0|RUNNING|node1\n{ARRAY_ID}_1|RUNNING|node1\n")
        tasks = [node(0), node(1)]
        assert [t.wait(timeout=240) for t in tasks] == [0, 0]
        (fake / "states").write_text(f"{ARRAY_ID}_0|COMPLETED|node1\n{ARRAY_ID}_1|COMPLETED|node1\n")
        assert driver.wait(timeout=60) == 0, log.read_text()[-3000:]

        subdir = override_dirname(overrides)
        runs = {seed: sweep / subdir / f"seed={seed}" for seed in (1, 2)}
        assert sorted(p.name for p in (sweep / subdir).iterdir()) == ["seed=1", "seed=2"]
        for task, seed in ((0, 1), (1, 2)):
            run_info = info(runs[seed])
            assert run_info["status"] == "completed" and run_info["seed"] == seed and run_info["attempts"] == 1
            assert run_info["slurm_job_id"] == f"{ARRAY_ID}_{task}"  # as squeue/sacct and .submitit/ name it
            assert (runs[seed] / "metrics.json").is_file() and (runs[seed] / ".hydra" / "config.yaml").is_file()
            logs = sweep / ".submitit" / f"{ARRAY_ID}_{task}"
            job_log = "".join((logs / f"{ARRAY_ID}_{task}_0_log.{x}").read_text() for x in ("out", "err"))
            assert "Job completed successfully" in job_log  # submitit's own line, in the srun --output/--error files
            assert "Map:" not in job_log and "it/s]" not in job_log  # no progress bars in SLURM logs
        assert "scancel" not in (fake / "calls.log").read_text()

        # ---- preemption of task 0: what submitit's USR2 handler does, then the requeued task runs again
        pkl = jobs[0]
        delayed = DelayedSubmission.load(pkl)
        requeued = delayed._checkpoint_function()  # SlurmLauncher.checkpoint: the same launcher and arguments
        requeued.set_timeout(delayed._timeout_min, delayed._timeout_countdown)
        requeued.dump(pkl)
        result = pkl.with_name(f"{ARRAY_ID}_0_0_result.pkl")  # <job id>_<task>_result.pkl
        result.unlink()
        stamp = sweep.name  # ${now:%Y-%m-%d_%H-%M-%S}: a re-resolution now would give another folder
        while time.strftime("%Y-%m-%d_%H-%M-%S") == stamp:
            time.sleep(0.2)
        assert node(0).wait(timeout=240) == 0
        outcome, job_return = pickle_load(result)
        assert outcome == "success"
        assert job_return.hydra_cfg.hydra.runtime.output_dir == str(runs[1])  # the same run dir
        assert [p.name for p in (work / "multirun").iterdir()] == [stamp]  # and no new sweep dir
        assert f"run in {runs[1]} already completed" in (pkl.parent / f"{ARRAY_ID}_0_0_log.out").read_text()
        assert info(runs[1])["status"] == "completed"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---- one data-parallel run per SLURM job: tasks_per_node > 1 --------------------------------------------
@needs_data()
def test_slurm_data_parallel_job_renders_one_task_per_gpu(tmp_path, tiny_overrides):
    """tasks_per_node=2 gpus_per_node=2: one job whose srun starts two tasks (srun inherits the job's task
    count), each running the Hydra job; the job's pickle is the same for both."""
    env = fake_slurm(tmp_path / "slurm")
    fake, work = tmp_path / "slurm", tmp_path / "work"
    work.mkdir()
    log = tmp_path / "robustft.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([ROBUSTFT, "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
                                   "hydra.launcher.gpus_per_node=2", "seed=1", *tiny_overrides, f"data_dir={DATA_DIR}"],
                                  cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(list(work.glob("multirun/*/.submitit/*/*_submitted.pkl"))) == 1, driver, log)
        script = (fake / "sbatch_0.sh").read_text()
        flags = dict(line[len("#SBATCH --"):].partition("=")[::2] for line in script.splitlines()
                     if line.startswith("#SBATCH --"))
        assert flags["ntasks-per-node"] == "2" and flags["gpus-per-node"] == "2" and flags["nodes"] == "1"
        assert flags["cpus-per-task"] == str(SLURM_CONF.cpus_per_task)  # per task, i.e. per GPU
        (command,) = [line for line in script.splitlines() if line.startswith("srun ")]
        assert "--ntasks" not in command and " -m submitit.core._submit " in command  # every task runs the job
        assert "_%t_log.out --error " in command  # one log per task (%t: the task's rank)
    finally:
        driver.kill()
        driver.wait()


SLURM_TASK = """
import torch
from robustft import distributed as D
info = D.init(timeout_s=60)
total = D.all_reduce_sum(torch.tensor([info.rank + 1.0]))
print(info.source, info.rank, info.local_rank, info.world_size, D.world_size(), total.item(),
      D.broadcast_object(f"from {info.rank}"), flush=True)
D.destroy()
"""


def test_slurm_tasks_join_one_process_group(tmp_path):
    """Two tasks of one SLURM step (SLURM's variables only, no torchrun's) join one gloo group and agree."""
    from tests.ddp_helpers import free_port

    env = cli_env()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
               SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", SLURM_TASK], env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split() for out, _ in outs] == [["slurm", "0", "0", "2", "2", "3.0", "from", "0"],
                                                ["slurm", "1", "1", "2", "2", "3.0", "from", "0"]]


# srun for a multi-task step: every task of the job runs the command, with its SLURM_PROCID/SLURM_LOCALID
MULTI_TASK_SRUN = SRUN_OPTIONS + """expand() { local s=$1; s=${s//%j/$SLURM_JOB_ID}; echo "${s//%t/$2}"; }
pids=
for t in $(seq 0 $((SLURM_NTASKS - 1))); do
  ( export SLURM_PROCID=$t SLURM_LOCALID=$t SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST
    exec >>"$(expand "$out" $t)" 2>>"$(expand "$err" $t)"; exec "$@" ) &
  pids="$pids $!"
done
rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc
"""


@needs_data()
@pytest.mark.slow
def test_slurm_data_parallel_job_trains_and_requeues(tmp_path, tiny_overrides):
    """One 2-task job: both tasks run the Hydra job as one data-parallel run in one run directory; after a
    requeue (task 0 re-dumps the submission, as submitit's USR2 handler) both tasks find the run done."""
    from submitit.core.utils import DelayedSubmission, pickle_load

    from tests.ddp_helpers import free_port

    env = fake_slurm(tmp_path / "slurm")
    fake, work = tmp_path / "slurm", tmp_path / "work"
    (fake / "bin" / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> "$FAKE_SLURM/calls.log"\n{MULTI_TASK_SRUN}')
    work.mkdir()
    overrides = [*tiny_overrides, "trainer.max_steps=4", f"data_dir={DATA_DIR}"]
    log = tmp_path / "robustft.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([ROBUSTFT, "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
                                   "seed=1", *overrides], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    node_env = dict(env, SLURM_JOB_ID=str(ARRAY_ID), SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
                    SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    try:
        wait_for(lambda: len(list(work.glob("multirun/*/.submitit/*/*_submitted.pkl"))) == 1, driver, log)
        (sweep,) = [p.resolve() for p in (work / "multirun").iterdir()]
        folder = sweep / ".submitit" / str(ARRAY_ID)
        (fake / "states").write_text(f"{ARRAY_ID}|RUNNING|localhost\n")
        assert subprocess.run(["bash", str(fake / "sbatch_0.sh")], cwd=work, env=node_env, timeout=600).returncode == 0
        (fake / "states").write_text(f"{ARRAY_ID}|COMPLETED|localhost\n")
        assert driver.wait(timeout=60) == 0, log.read_text()[-3000:]
        run = sweep / override_dirname(overrides) / "seed=1"
        assert info(run)["status"] == "completed" and (run / "metrics.json").is_file()
        assert info(run)["world_size"] == 2  # one data-parallel run of both tasks, not two runs
        results = [folder / f"{ARRAY_ID}_{t}_result.pkl" for t in (0, 1)]
        assert [pickle_load(r)[0] for r in results] == ["success", "success"]

        pkl = folder / f"{ARRAY_ID}_submitted.pkl"  # the requeue: task 0's handler re-dumps the submission
        delayed = DelayedSubmission.load(pkl)
        requeued = delayed._checkpoint_function()
        requeued.set_timeout(delayed._timeout_min, delayed._timeout_countdown)
        requeued.dump(pkl)
        for r in results:
            r.unlink()
        node_env["MASTER_PORT"] = str(free_port())
        assert subprocess.run(["bash", str(fake / "sbatch_0.sh")], cwd=work, env=node_env, timeout=600).returncode == 0
        assert [pickle_load(r)[0] for r in results] == ["success", "success"]
        assert f"run in {run} already completed" in (folder / f"{ARRAY_ID}_0_log.out").read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def test_request_above_the_partition_names_its_limits(tmp_path, monkeypatch):
    """The pre-flight's check against `sinfo` (a stand-in here): the smallest node of the default partition."""
    from robustft.errors import UserError
    from robustft.slurm import check_request

    sinfo = tmp_path / "sinfo"
    sinfo.write_text('#!/bin/bash\necho "cpu*|8|16000|(null)"\necho "cpu*|4|32000|(null)"\necho "gpu|32|512000|gpu:a100:4"\n')
    sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fits = {"partition": None, "tasks_per_node": 1, "cpus_per_task": 4, "mem_gb": 15, "gpus_per_node": 0}
    check_request(OmegaConf.create(fits))  # no error: 4 CPUs and 15 GB fit the smallest node
    with pytest.raises(UserError, match=r"^hydra.launcher.cpus_per_task=4 x tasks_per_node=2 = 8 CPUs per node, but "
                       r"the nodes of SLURM partition cpu have 4 CPUs \(sinfo\); use hydra.launcher.cpus_per_task=2 "):
        check_request(OmegaConf.create({**fits, "tasks_per_node": 2}))
    with pytest.raises(UserError, match=r"^hydra.launcher.mem_gb=16 per node, .* have 16000 MB \(sinfo\); use "
                       r"hydra.launcher.mem_gb=15 "):
        check_request(OmegaConf.create({**fits, "mem_gb": 16}))
    with pytest.raises(UserError, match=r"^hydra.launcher.gpus_per_node=1 per node, .* cpu have 0 GPUs"):
        check_request(OmegaConf.create({**fits, "gpus_per_node": 1}))
