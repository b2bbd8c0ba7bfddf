"""One run across processes: who this process is, the process group, and the few collectives robustft uses.

A run is data-parallel when it starts under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)
or as one task of a multi-task SLURM step (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master address is
the step's first node). Otherwise `env()` says world size 1 and every helper here is a no-op that returns its
input, so single-process runs take exactly the code path they always took.

The backend is NCCL when CUDA is available, else gloo (these CPU machines test gloo; the code path is the
same). Collectives on tensors follow the backend's device: gloo reduces CPU tensors, NCCL CUDA tensors;
`all_reduce_sum` moves a CPU tensor to the rank's GPU for NCCL and back.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from robustft.dist_env import DistEnv, env, first_slurm_host  # noqa: F401  (re-exported: distributed.env())

T = TypeVar("T")
_CONTROL: Any = None  # a gloo group beside the job's for `settle` (a barrier with a timeout, also under NCCL)


def init(timeout_s: float = 1800.0) -> DistEnv:
    """Join the job's process group (once); returns this process's `DistEnv`. No-op for one process."""
    info = env()
    if not info.distributed or is_initialized():
        return info
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # modulo: a cluster that binds one GPU per task shows each task only its own
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    global _CONTROL
    _CONTROL = dist.new_group(backend="gloo")
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend() -> str | None:
    """"gloo" or "nccl" in a process group, else None."""
    return str(dist.get_backend()) if is_initialized() else None


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    global _CONTROL
    if is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def settle(timeout_s: float = 30.0) -> bool:
    """Wait, at most `timeout_s`, until every rank got here; True if they all did.

    A rank that ends with an error calls it before exiting: torchrun stops the whole job as soon as one
    process exits with an error, so without it rank 0 could be killed while it records the failure in
    run_info.json. A rank that is elsewhere (a failure of this rank alone) makes it time out instead of
    hanging; it runs on its own gloo group so it cannot be mistaken for a collective of the training.
    """
    if world_size() == 1 or _CONTROL is None:
        return True
    try:
        dist.monitored_barrier(group=_CONTROL, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError:
        return False
    return True


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (pickled; for small things: a path, a decision, metrics)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (a new tensor on `t`'s device); `t` itself is unchanged."""
    if world_size() == 1:
        return t
    on = t.detach().clone()
    if dist.get_backend() == "nccl" and on.device.type != "cuda":
        on = on.cuda()
    dist.all_reduce(on, op=dist.ReduceOp.SUM)
    return on.to(t.device)


def shard_bounds(n: int, world: int | None = None, at: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank `at`'s contiguous share of n items: sizes differ by at most one, lower ranks
    take the extra ones, so gathering the shards in rank order restores the original order."""
    world = world_size() if world is None else world
    at = rank() if at is None else at
    base, extra = divmod(n, world)
    start = at * base + min(at, extra)
    return start, start + base + (1 if at < extra else 0)


def gather_in_order(items: Sequence[T]) -> list[T]:
    """Concatenate every rank's `items` in rank order (the inverse of `shard_bounds`), on every rank."""
    if world_size() == 1:
        return list(items)
    return [x for part in all_gather_object(list(items)) for x in part]
