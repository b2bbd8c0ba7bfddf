"""One run across processes (torch.distributed, gloo on CPU; the NCCL path is the same code): 2 ranks with
a global batch of 32 train like 1 process with batch 32, resume exactly, and write one run directory.

The 2-rank runs happen in spawned workers (as tests/test_distributed_env.py) calling `runner.fit`, and once
through `torchrun -m robustft` (the CLI path: the agreed run directory, rank 0's files, per-rank logs).
Dropout is off in the equivalence runs: the ranks draw their own dropout masks, one process draws one set.
Tolerance: fp32 sums in another order (DDP averages the two half-batch gradients) move the weights by a
few 1e-8 after 4 AdamW steps; the tests allow 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustft.checkpoint import load_training_state
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import DATA_DIR, make_cfg, needs_data
from tests.ddp_helpers import free_port, run_ranks

pytestmark = needs_data()

NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]
TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=64", "task.max_eval_samples=40",
        "trainer.epochs=2", "trainer.batch_size=32", "trainer.eval_every=2", "trainer.log_every=1",
        "trainer.save_every=3", "trainer.precision=fp32", "trainer.max_length=32", "seed=3", *NO_DROPOUT]
# 49 rows, batches of 16 in groups of 2: the last group is [16 rows, 1 row]; on 2 ranks the 1-row batch
# leaves rank 1 without rows (it joins the backward with a weight-0 row)
UNEVEN = [*TINY, "task.max_train_samples=49", "trainer.batch_size=16", "trainer.grad_accum=2"]
COMPARED = ("validation/accuracy", "validation/loss", "best/step", "train/steps", "train/examples",
            "cost/train_tokens", "cost/train_flops")


def _run_jobs(rank: int, jobs: list[tuple[str, list[str], str]]) -> dict:
    """Run `jobs` (name, overrides, run dir) on this rank; each job's metrics or its error type."""
    from robustft.errors import Interrupted, UserError

    results = {}
    for name, overrides, path in jobs:
        try:
            results[name] = fit(make_cfg(overrides), RunDir(path))
        except Interrupted:
            results[name] = "interrupted"
        except UserError as e:
            results[name] = f"error: {e}"
    return results


def run_two_ranks(jobs: list[tuple[str, list[str], Path]]) -> dict[str, dict]:
    """Rank 0's results of `jobs`, run in order on a 2-process gloo group (both ranks must agree)."""
    results = run_ranks(_run_jobs, 2, [(name, over, str(path)) for name, over, path in jobs], timeout=600)
    assert results[0].keys() == results[1].keys() == {name for name, _, _ in jobs}
    for name in results[0]:
        if isinstance(results[0][name], dict):  # every rank ends with the same (broadcast) metrics
            assert {k: results[0][name][k] for k in COMPARED} == {k: results[1][name][k] for k in COMPARED}
    return results[0]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


RESUME = [o for o in [*TINY, "trainer.epochs=3", "trainer.save_every=2"] if o not in NO_DROPOUT]  # dropout on:
# each rank's own RNG stream must resume too


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """All 2-rank runs of this module in one spawn (the workers' imports cost more than the runs)."""
    root = tmp_path_factory.mktemp("ddp")
    return root, run_two_ranks([("even", TINY, root / "ddp_even"), ("uneven", UNEVEN, root / "ddp_uneven"),
                                ("full", RESUME, root / "full"),
                                ("cut", [*RESUME, "+trainer.interrupt_at_step=3"], root / "cut"),
                                ("resumed", RESUME, root / "cut"),
                                ("cut2", [*RESUME, "+trainer.interrupt_at_step=3"], root / "cut2"),
                                ("devices", [*TINY, "trainer.devices=4"], root / "devices"),
                                ("pruned", [*TINY, "trainer.keep_checkpoints=none"], root / "pruned")])


@pytest.mark.parametrize(("name", "over"), [("even", TINY), ("uneven", UNEVEN)])
def test_two_ranks_train_like_one_process(two_ranks, tmp_path, name, over):
    """Global batch 32 as 2 x 16 vs 1 x 32; and grad_accum=2 with a last batch of 1 row (rank 1 gets none)."""
    root, ddp = two_ranks
    torch.set_num_threads(1)
    single = fit(make_cfg(over), RunDir(tmp_path))
    assert max_diff(weights(root / f"ddp_{name}"), weights(tmp_path)) < 1e-6
    for key in COMPARED:
        assert ddp[name][key] == pytest.approx(single[key], abs=1e-4), key
    assert ddp[name]["train/examples"] == single["train/examples"]  # global counts, exactly
    assert ddp[name]["cost/train_tokens"] == single["cost/train_tokens"]
    one = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (root / f"ddp_{name}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two, strict=True):  # train rows: the global batch's mean loss, synced per row
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-5)
    # per-example records: rank 0 writes every example once (the ranks' shards gathered), as one process does
    records = [(d / "predictions" / "validation.jsonl").read_text() for d in (tmp_path, root / f"ddp_{name}")]
    assert records[0] == records[1] and len(records[0].splitlines()) == 40


def test_interrupted_two_rank_run_resumes_exactly(two_ranks):
    root, res = two_ranks
    assert res["cut"] == "interrupted"
    a, b = weights(root / "full"), weights(root / "cut")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for key in COMPARED:
        assert res["resumed"][key] == res["full"][key], key
    assert res["uneven"]["train/examples"] == 2 * 49
    assert res["devices"].startswith("error: trainer.devices=4 but this run has 2 process(es); start it with torchrun")
    state = load_training_state(root / "cut" / "checkpoints" / "last")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 1  # rank 1's; rank 0's is "rng"
    assert not torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])  # dropout streams diverged


def test_keep_checkpoints_none_prunes_after_every_rank_is_done(two_ranks):
    root, res = two_ranks
    assert {k: res["pruned"][k] for k in COMPARED} == {k: res["even"][k] for k in COMPARED}
    assert (root / "pruned" / "metrics.json").is_file() and not (root / "pruned" / "checkpoints").exists()


def test_a_two_rank_checkpoint_resumes_on_one_process_with_a_warning(two_ranks, caplog):
    """trainer.batch_size is the global batch: another number of processes continues the same batches and
    optimizer steps; only the dropout streams differ, which the warning says."""
    root, res = two_ranks
    torch.set_num_threads(1)
    with caplog.at_level("WARNING", logger="robustft"):
        resumed = fit(make_cfg(RESUME), RunDir(root / "cut2"))
    assert "written by 2 process(es), this run has 1" in caplog.text
    assert json.loads((root / "cut2" / "run_info.json").read_text())["resumed_from_step"] == 3
    for key in ("train/steps", "train/examples", "cost/train_tokens"):
        assert resumed[key] == res["full"][key], key


def torchrun(commands: dict[str, list[str]], cwd: Path, timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """`torchrun --nproc_per_node=2 -m robustft <args>` per entry, side by side (imports dominate)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = {name: subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                     f"--master_port={free_port()}", "-m", "robustft", *args], cwd=cwd, env=env,
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in commands.items()}
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def test_torchrun_makes_one_run_directory_written_by_rank_0_and_refuses_a_sweep(tmp_path):
    base = [f"data_dir={DATA_DIR}", *TINY]
    r = torchrun({"run": [*base, "trainer.epochs=1"], "sweep": ["-m", *base, "seed=1,2"]}, tmp_path)
    assert r["run"].returncode == 0, r["run"].stderr[-3000:]
    runs = list((tmp_path / "outputs" / "sst2" / "vanilla").iterdir())
    assert len(runs) == 1, runs  # the timestamped default, decided by rank 0 for both ranks
    run = runs[0]
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == 2
    assert {p.name for p in run.iterdir()} == {".hydra", "checkpoints", "logs", "metrics.json", "metrics.jsonl",
                                               "predictions", "robustft.log", "run_info.json", "run_config.yaml",
                                               ".lock"}
    assert [p.name for p in (run / "logs").iterdir()] == ["rank1.log"]
    rank1 = (run / "logs" / "rank1.log").read_text().splitlines()
    assert rank1 and all(line.startswith("[rank1]") for line in rank1)
    assert "[rank1]" not in (run / "robustft.log").read_text()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]  # one writer: no duplicated rows
    # a sweep is refused before anything starts, with one line (rank 0 prints it)
    assert r["sweep"].returncode != 0 and not (tmp_path / "multirun").exists()
    assert r["sweep"].stderr.count("robustft: error: -m (a sweep) cannot run under torchrun (2 processes)") == 1


@pytest.mark.slow
def test_two_ranks_train_like_one_process_on_minilm(tmp_path):
    over = ["model=minilm", "task=sst2", "task.max_train_samples=256", "task.max_eval_samples=128",
            "trainer.epochs=1", "trainer.batch_size=32", "trainer.log_every=2", "trainer.precision=fp32",
            "trainer.max_length=64", "seed=1", *NO_DROPOUT]
    ddp = run_two_ranks([("minilm", over, tmp_path / "ddp")])["minilm"]
    torch.set_num_threads(2)
    single = fit(make_cfg(over), RunDir(tmp_path / "one"))
    assert max_diff(weights(tmp_path / "ddp"), weights(tmp_path / "one")) < 1e-5
    for key in COMPARED:
        assert ddp[key] == pytest.approx(single[key], abs=1e-4), key


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (2, True), (0, False), ("two", False)])
def test_trainer_devices_is_auto_or_a_count(value, ok):
    from robustft.errors import UserError
    from robustft.validate import validate_trainer

    cfg = make_cfg([]).trainer
    cfg.devices = value
    if ok:
        validate_trainer(cfg)
    else:
        with pytest.raises(UserError, match=r"trainer.devices=.* must be auto or a whole number >= 1"):
            validate_trainer(cfg)


@pytest.mark.slow
def test_sigterm_to_torchrun_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGTERM to the launcher (a preemption): run_info says interrupted; the same command resumes from the last
    checkpoint (save_every) and ends with the uninterrupted run's weights and curves, bit for bit.

    The signal comes in the worst case for rank 0, which must record the status (tests/ddp_helpers.TermLauncherAt):
    rank 1 gets it in Python code and leaves, while rank 0 waits for rank 1 in a gradient all-reduce; that
    collective fails and rank 0's own SIGTERM handler runs. (Rank 1 used to wait for its peers before exiting:
    a deadlock with the blocked rank 0 until torchrun's kill, status left `running`; about 1 in 7 runs.)"""
    over = [f"data_dir={DATA_DIR}", "model=tiny_random", "task.max_train_samples=3000", "task.max_eval_samples=64",
            "trainer.epochs=1", "trainer.batch_size=16", "trainer.precision=fp32", "trainer.max_length=64",
            "trainer.save_every=10", "trainer.log_every=5", "method._target_=tests.ddp_helpers.TermLauncherAt"]
    assert torchrun({"full": [*over, "hydra.run.dir=full"]}, tmp_path)["full"].returncode == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ROBUSTFT_TEST_TERM_AT="15",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    cut = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "robustft", *over, "hydra.run.dir=cut"],
                           cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert cut.wait(timeout=120) != 0
    assert json.loads((tmp_path / "cut" / "run_info.json").read_text())["status"] == "interrupted"
    assert torchrun({"resume": [*over, "hydra.run.dir=cut"]}, tmp_path)["resume"].returncode == 0
    assert json.loads((tmp_path / "cut" / "run_info.json").read_text())["resumed_from_step"] > 0
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

    def curves(run: Path) -> list[dict]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]

    assert curves(tmp_path / "cut") == curves(tmp_path / "full")
