"""Who this process is in a data-parallel job, read from torchrun's or SLURM's environment.

Free of torch, so the CLI can count the processes (robustft/launch.py) before torch is imported for --help
or a one-line error; robustft/distributed.py builds the process group from the same reading.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from torchrun's or SLURM's environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "none"  # torchrun | slurm | none

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-05,7],cpu1` -> `gpu03` (what `scontrol show hostnames`
    prints first), without calling scontrol."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun's variables win; a SLURM step with more than one task is the fallback; else one process."""
    e = os.environ if environ is None else environ
    if int(e.get("WORLD_SIZE", "1")) > 1:
        return DistEnv(rank=int(e["RANK"]), local_rank=int(e.get("LOCAL_RANK", "0")),
                       world_size=int(e["WORLD_SIZE"]), master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(e.get("MASTER_PORT", "29500")), source="torchrun")
    if int(e.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in e and "SLURM_STEP_NODELIST" in e:
        # SLURM_STEP_NODELIST: the nodes of this srun step (the job's list may hold more)
        port = int(e.get("MASTER_PORT", 20000 + int(e.get("SLURM_JOB_ID", "0")) % 10000))
        return DistEnv(rank=int(e["SLURM_PROCID"]), local_rank=int(e.get("SLURM_LOCALID", "0")),
                       world_size=int(e["SLURM_NTASKS"]),
                       master_addr=e.get("MASTER_ADDR") or first_slurm_host(e["SLURM_STEP_NODELIST"]),
                       master_port=port, source="slurm")
    return DistEnv()
