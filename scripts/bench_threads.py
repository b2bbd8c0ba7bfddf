#!/usr/bin/env python
"""Training speed with torch's threads = the cores against one thread, beside another CPU-bound process.

Why (README "CPU threads", issue 25): torch starts one OpenMP thread per core; when another process keeps
a core busy, those threads wait for each other at every operation. Each arm is the real CLI in a fresh
process (`python -m robustft ... trainer.threads=N`) while `--competitors` busy-loop processes run; the
number is the run's own `train/examples_per_s` (metrics.json). Arms alternate (A B B A ...) so a drift in
machine load hits both alike; the median of `--repeats` runs is printed with the load average before each
run, and the ratio of the two medians.

Examples::

    python scripts/bench_threads.py                          # minilm, 512 SST-2 examples, 1 competitor, 2 repeats
    python scripts/bench_threads.py --competitors 0          # the same on a machine left alone
    python scripts/bench_threads.py --model tiny_random --train-examples 64 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUSY = "while True: pass"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--competitors", type=int, default=1, help="busy-loop processes running beside every arm")
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_arm(args: argparse.Namespace, threads: int, out: Path) -> float:
    """One training run with trainer.threads=`threads`; its train/examples_per_s."""
    cmd = [sys.executable, "-m", "robustft", f"model={args.model}", f"task={args.task}", "trainer.epochs=1",
           f"task.max_train_samples={args.train_examples}", "task.max_eval_samples=32", "trainer.precision=fp32",
           "trainer.save_checkpoints=false", f"trainer.threads={threads}", f"hydra.run.dir={out}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # trainer.threads decides
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    return float(json.loads((out / "metrics.json").read_text())["train/examples_per_s"])


def main() -> None:
    args = parse_args()
    arms = {f"threads={cores()}": cores(), "threads=1": 1}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the busy processes
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.competitors)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            order = [name for r in range(args.repeats) for name in (list(arms) if r % 2 == 0 else list(arms)[::-1])]
            for i, name in enumerate(order):
                load = os.getloadavg()[0]
                rate = run_arm(args, arms[name], Path(tmp) / f"run{i}")
                rates[name].append(rate)
                print(f"{name:12s} {rate:8.1f} ex/s  (load average before: {load:.1f})", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    med = {name: statistics.median(v) for name, v in rates.items()}
    many, one = med[f"threads={cores()}"], med["threads=1"]
    print(f"{args.model}, {args.task}, {args.train_examples} examples, {cores()} cores, {args.competitors} busy "
          f"process(es): threads={cores()} {many:.1f} ex/s, threads=1 {one:.1f} ex/s (threads=1 {one / many:.2f}x)")


if __name__ == "__main__":
    main()
