"""torch's CPU threads for a run (`trainer.threads`), set once at its start.

Why: torch starts one OpenMP thread per core by default. With another CPU-bound process on the same
cores (a second run, a sweep's other job), its threads wait at OpenMP barriers for cores that are busy:
minilm trained 7-9x slower on 2 shared cores (issue 25: 14-19 against 125-137 examples/s with
OMP_NUM_THREADS=1). `auto` therefore divides the cores this process may use among the jobs that share
them, and warns when the machine is already busier than its cores at start.

At the bottom of the layers: imports only torch, hydra's config singleton and the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

log = logging.getLogger("robustft")

# Hydra launchers that run a sweep's jobs side by side on this machine
LOCAL_PARALLEL_LAUNCHERS = ("LocalLauncher", "JoblibLauncher")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, a SLURM or container CPU limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows: no affinity mask
        return max(1, os.cpu_count() or 1)


def parallel_sweep_job() -> bool:
    """Whether this is one job of a sweep whose jobs run side by side here (submitit_local, joblib)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return True
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(HydraConfig.get().launcher.get("_target_", ""))
    return target.endswith(LOCAL_PARALLEL_LAUNCHERS)


def auto_threads(cores: int, local_processes: int, parallel_job: bool, omp_env: str | None) -> int:
    """`trainer.threads=auto`: one per job in a local parallel sweep; else OMP_NUM_THREADS when the user set
    it (torchrun sets 1 for several processes); else the cores divided among this machine's processes."""
    if parallel_job:
        return 1
    if omp_env and omp_env.strip().isdigit() and int(omp_env) >= 1:
        return int(omp_env)
    return max(1, cores // max(1, local_processes))


def configure(setting: Any) -> int:
    """Set torch's intra-op (and, when still possible, inter-op) threads for this run; returns the count.

    `setting`: "auto" or a whole number >= 1 (anything else is left to robustft.validate's one line). Warns once when the 1-minute
    load average already exceeds the cores at start: other processes share them, and the run will be slower.
    """
    cores = available_cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun's processes on this node
    if setting == "auto":
        n = auto_threads(cores, local, parallel_sweep_job(), os.environ.get("OMP_NUM_THREADS"))
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        n = setting
    else:  # a bad value: robustft.validate reports it (a sweep job's one line) as the run starts
        return torch.get_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # allowed only before the first inter-op parallel work
        torch.set_num_interop_threads(n)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        fix = "run fewer jobs at once" + (" or set trainer.threads=1" if n > 1 else "")
        log.warning("the machine is busy (load average %.1f on %d cores): this run's %d torch thread(s) compete "
                    "with other processes and may run several times slower; %s (README \"CPU threads\")",
                    load, cores, n, fix)
    return n
