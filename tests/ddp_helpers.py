"""Running a function on a real N-process gloo group (CPU) from a test: `run_ranks(fn, world, *args)`; and
`TermLauncherAt`, a method that makes a torchrun job receive SIGTERM at a chosen moment.

`fn` must be a module-level function (spawned processes import it); it runs inside an initialised process
group with one torch thread and returns something picklable. The results come back in rank order; a rank
that raised makes the test fail with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from robustft import distributed as D
from robustft.methods.vanilla import Vanilla


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


class TermLauncherAt(Vanilla):
    """Vanilla, except that with ROBUSTFT_TEST_TERM_AT=k in the environment, rank 1 sends SIGTERM to torchrun
    (its parent) in its k-th training step, from Python code, while rank 0 waits for it in that step's
    gradient all-reduce. torchrun forwards the signal to both ranks: the preemption race, made certain.
    (`method._target_=tests.ddp_helpers.TermLauncherAt`; without the variable it trains as vanilla.)"""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls = 0

    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        self.calls += 1
        if os.environ.get("RANK") == "1" and str(self.calls) == os.environ.get("ROBUSTFT_TEST_TERM_AT"):
            time.sleep(1.0)  # rank 0 is in its backward by now, waiting for this rank's gradients
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(60)  # the forwarded SIGTERM interrupts this sleep
        return super().training_step(model, batch)
