#!/usr/bin/env python
"""Data-parallel training throughput on CPUs, in one run: 2 ranks x 1 thread (`torchrun --nproc_per_node=2
-m robustft`, gloo) against 1 process x 2 threads (`python -m robustft`), vanilla fine-tuning at the same
global batch, steps, data slice, precision and seed.

Both arms are the real CLI in a fresh process; the number reported is the run's own
`train/examples_per_s` (metrics.json): global examples over rank 0's training time, from collation to
`zero_grad`, evaluation and start-up excluded. Arms alternate (A B B A ...) so a drift in machine load
hits both alike; the median of `--repeats` runs is reported, with the load average before each run.

GPUs (NCCL) cannot be measured on these machines; the code path is the same (robustft/loop.py).

Examples::

    python scripts/bench_ddp.py                       # minilm, 1,024 examples, batch 32, 2 repeats
    python scripts/bench_ddp.py --model tiny_random --train-examples 128 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {"ddp_2x1": "2 ranks x 1 thread (torchrun, gloo)", "single_1x2": "1 process x 2 threads"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--train-examples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch (both arms)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(arm: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """One training run of `arm` in a fresh process; its metrics.json numbers."""
    overrides = [f"model={args.model}", f"task={args.task}", f"data_dir={args.data_dir}",
                 f"task.max_train_samples={args.train_examples}", "task.max_eval_samples=32", "trainer.epochs=1",
                 f"trainer.batch_size={args.batch_size}", f"trainer.max_length={args.max_length}",
                 "trainer.precision=fp32", "trainer.save_checkpoints=false", "trainer.log_every=1000", "seed=1",
                 f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1" if arm == "ddp_2x1" else "2")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"] \
        if arm == "ddp_2x1" else []
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, *launcher, "-m", "robustft", *overrides], env=env, text=True,
                          capture_output=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"examples_per_s": metrics["train/examples_per_s"], "examples": metrics["train/examples"],
            "steps": metrics["train/steps"], "wall_s": metrics["train/wall_s"], "load_before": load}


def main() -> None:
    args = parse_args()
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    order = list(ARMS)
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        for r in range(args.repeats):
            for arm in order if r % 2 == 0 else order[::-1]:
                res = run_arm(arm, args, Path(tmp) / f"{arm}_{r}")
                runs[arm].append(res)
                print(f"  {arm:11s} run {r + 1}: {res['examples_per_s']:7.1f} ex/s  ({res['examples']} examples, "
                      f"{res['steps']} steps, load {res['load_before']:.1f})", flush=True)
    median = {arm: statistics.median(x["examples_per_s"] for x in runs[arm]) for arm in ARMS}
    print(f"\n{args.model} {args.task}, {args.train_examples} examples, global batch {args.batch_size}, "
          f"max_length {args.max_length}, fp32, {os.cpu_count()} CPUs")
    for arm, what in ARMS.items():
        print(f"{what:38s} {median[arm]:7.1f} ex/s (median of {len(runs[arm])})")
    print(f"ratio ddp_2x1 / single_1x2: {median['ddp_2x1'] / median['single_1x2']:.2f}")
    print("GPU (NCCL) not measured: no GPU on this machine.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "median_examples_per_s": median}, indent=2) + "\n")


if __name__ == "__main__":
    main()
