"""`hydra/launcher=slurm` (hydra_plugins/robustft_slurm/launcher.py: hydra-submitit-launcher's SlurmLauncher):
what a sweep's driver owes its user.

The plugin's `launch` submits the array and then reads every job's result: the first failed or cancelled job
raised submitit's error, a ~40-line traceback (the job's one-line error buried inside) that ended the sweep
with exit 1 while the other jobs ran on unseen, and while waiting it printed nothing (a job pending forever
on a too-large request looked like a hang). Here the driver logs the job ids and where to look (`squeue`,
`<sweep>/.submitit/<job>/`), waits for every job, names each one that fails with its own `robustft: error:`
line (read from its log), and robustft.cli exits 2 at the end (`FAILED_JOBS`). The compute-node side (the
pickled `__call__`, `checkpoint` for submitit's USR2 requeue) is the plugin's.

`check_request` is the pre-flight's: a request above the partition's nodes (`sinfo`) would pend forever.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustft.errors import UserError

log = logging.getLogger("robustft")

# the one-line errors of the jobs of this driver's sweep that failed (robustft.cli exits 2 when any)
FAILED_JOBS: list[str] = []


def job_error_line(paths: Sequence[Path]) -> str | None:
    """The last `robustft: error:` line a job wrote (task 0's stderr first), without the prefix."""
    for path in paths:
        if path.is_file():
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("robustft: error: ")]
            if lines:
                return lines[-1][len("robustft: error: "):]
    return None


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Submit the array, log the job id and the logs' folder, wait for every job; a job that failed or was
    cancelled gets its one line (FAILED_JOBS) and a JobReturn without a value, so the sweep goes on."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import FailedJobError, UncompletedJobError

    jobs = submit(launcher, job_overrides, initial_job_idx)
    sweep = Path(str(launcher.config.hydra.sweep.dir)).resolve()
    array = str(jobs[0].job_id).split("_")[0]
    log.info("submitted SLURM job %s (%d job%s): `squeue -j %s` shows them, `sacct -j %s` how they ended; "
             "logs in %s/.submitit/<job id>/; waiting for them to finish", array, len(jobs),
             "s" if len(jobs) > 1 else "", array, array, sweep)
    common = set.intersection(*(set(o) for o in job_overrides))  # the error line names what the job's sweep varies
    returns = []
    for overrides, job in zip(job_overrides, jobs, strict=True):
        try:
            returns.append(job.results()[0])
            log.info("SLURM job %s finished", job.job_id)
            continue
        except (UncompletedJobError, FailedJobError):
            pass
        stderr = [job.paths.stderr, *sorted(job.paths.folder.glob(f"{job.job_id}_*_log.err"))]
        line = job_error_line(stderr) or (f"the job ended {job.state} without a result; its log: {job.paths.stderr} "
                                          f"(`sacct -j {job.job_id}`)")
        message = f"SLURM job {job.job_id} ({' '.join(o for o in overrides if o not in common) or 'the only job'}): {line}"
        print(f"robustft: error: {message}", file=sys.stderr, flush=True)
        FAILED_JOBS.append(message)
        failed = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
        failed.return_value = None  # Hydra's sweeper reads it: the job's line is printed, the sweep goes on
        returns.append(failed)
    return returns


def submit(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """The plugin's `launch` up to the submission (executor, parameters, sweep dir): the submitted jobs."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    kind, params = launcher._EXECUTOR, launcher.params
    init_keys = {"max_num_timeout", "submitit_folder"}
    executor = submitit.AutoExecutor(cluster=kind, folder=params["submitit_folder"],
                                     **{f"{kind}_max_num_timeout": params["max_num_timeout"]})
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items() if k not in init_keys})
    sweep = launcher.config.hydra.sweep
    Path(str(sweep.dir)).mkdir(parents=True, exist_ok=True)
    if "mode" in sweep:
        os.chmod(str(sweep.dir), mode=int(str(sweep.mode), 8))
    jobs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        jobs.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    return executor.map_array(launcher, *zip(*jobs, strict=True))


# ---- pre-flight: a request the partition's nodes cannot hold pends forever (Reason: PartitionConfig) ----------
def partition_limits(partition: str | None) -> dict[str, Any] | None:
    """CPUs, memory (MB) and GPUs of the smallest node of `partition` (the default one if None), from `sinfo`;
    None without `sinfo` (no Slurm here: the submission will say) or an unknown partition."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    if not partition:
        rows = [r for r in rows if r[0].endswith("*")]
    if not rows:
        return None
    gpus = [sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:(,]+)?:(\d+)", r[3])) for r in rows]
    return {"partition": rows[0][0].rstrip("*"), "cpus": min(int(r[1].rstrip("+")) for r in rows),
            "mem_mb": min(int(r[2].rstrip("+")) for r in rows), "gpus": min(gpus)}


def check_request(launcher: Any) -> None:
    """UserError naming the partition's limits when the launcher asks one node for more than its nodes have."""
    limits = partition_limits(launcher.get("partition"))
    if limits is None:
        return
    tasks = int(launcher.get("tasks_per_node") or 1)
    cpus = int(launcher.get("cpus_per_task") or 1) * tasks
    mem_mb = float(launcher.get("mem_gb") or 0) * 1024
    gpus = int(launcher.get("gpus_per_node") or 0)
    name, fits = limits["partition"], []
    if cpus > limits["cpus"]:
        fits.append((f"hydra.launcher.cpus_per_task={launcher.cpus_per_task} x tasks_per_node={tasks} = {cpus} CPUs",
                     f"{limits['cpus']} CPUs", f"hydra.launcher.cpus_per_task={max(1, limits['cpus'] // tasks)}"))
    if mem_mb > limits["mem_mb"]:
        fits.append((f"hydra.launcher.mem_gb={launcher.mem_gb}", f"{limits['mem_mb']} MB",
                     f"hydra.launcher.mem_gb={max(1, limits['mem_mb'] // 1024)}"))
    if gpus > limits["gpus"]:
        fits.append((f"hydra.launcher.gpus_per_node={gpus}", f"{limits['gpus']} GPUs",
                     f"hydra.launcher.gpus_per_node={limits['gpus']}"))
    if fits:
        asked, has, fix = fits[0]
        raise UserError(f"{asked} per node, but the nodes of SLURM partition {name} have {has} (sinfo); use {fix} "
                        "or hydra.launcher.partition=<a larger one>")
