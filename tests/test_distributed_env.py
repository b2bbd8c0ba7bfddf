"""robustft/distributed.py: reading torchrun's and SLURM's environment, shard bounds, and the collectives
on a real 2-process gloo group (CPU)."""

from __future__ import annotations

import pytest
import torch

from robustft import distributed as D
from tests.ddp_helpers import run_ranks


def test_env_single_process():
    assert D.env({}) == D.DistEnv()
    assert not D.env({"WORLD_SIZE": "1", "RANK": "0"}).distributed


def test_env_torchrun():
    e = D.env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port, e.source) == (3, 1, 4, "node7", 1234,
                                                                                         "torchrun")


def test_env_slurm_multi_task():
    e = D.env({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "12345",
               "SLURM_STEP_NODELIST": "gpu[03-04]"})
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.source) == (2, 0, 4, "gpu03", "slurm")
    assert e.master_port == 20000 + 12345 % 10000
    # a single-task SLURM job (the array launcher's default) is one process
    assert not D.env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "a1"}).distributed


@pytest.mark.parametrize(("nodelist", "first"), [("gpu[03-05,7],cpu1", "gpu03"), ("node12", "node12"),
                                                  ("a[1,3]", "a1"), ("n-[010-012]", "n-010")])
def test_first_slurm_host(nodelist, first):
    assert D.first_slurm_host(nodelist) == first


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (0, 2), (7, 1), (32, 2)])
def test_shard_bounds_cover_in_order(n, world):
    bounds = [D.shard_bounds(n, world, r) for r in range(world)]
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_no_op_without_a_group():
    t = torch.tensor([1.0, 2.0])
    assert D.world_size() == 1 and D.is_main()
    assert D.all_reduce_sum(t) is t
    assert D.broadcast_object("x") == "x" and D.gather_in_order([1, 2]) == [1, 2]


def _collectives(rank: int) -> tuple:
    total = D.all_reduce_sum(torch.tensor([rank + 1.0, 10.0]))
    a, b = D.shard_bounds(5)
    return total.tolist(), D.broadcast_object(f"from {rank}"), D.gather_in_order(list(range(a, b)))


def test_collectives_on_two_gloo_processes():
    for total, msg, gathered in run_ranks(_collectives, 2, timeout=120):
        assert total == [3.0, 20.0] and msg == "from 0" and gathered == [0, 1, 2, 3, 4]
