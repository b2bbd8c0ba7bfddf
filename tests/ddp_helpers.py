"""Running a function on a real N-process gloo group (CPU) from a test: `run_ranks(fn, world, *args)`.

`fn` must be a module-level function (spawned processes import it); it runs inside an initialised process
group with one torch thread and returns something picklable. The results come back in rank order; a rank
that raised makes the test fail with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from robustft import distributed as D


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    try:
        D.init(timeout_s=120)
        # plain pickle bytes: tensors sent through the queue as such would be shared-memory handles that die
        # with this process
        out.put((rank, "ok", pickle.dumps(fn(rank, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        out.put((rank, "error", traceback.format_exc()))
    finally:
        D.destroy()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """fn(rank, *args) on each rank of a `world`-process gloo group; the results in rank order."""
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = sorted((out.get(timeout=timeout) for _ in procs), key=lambda x: x[0])
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{res}" for r, status, res in got if status != "ok"]
    assert not errors, "\n".join(errors)
    return [pickle.loads(res) for _, _, res in got]
