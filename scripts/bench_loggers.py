#!/usr/bin/env python
"""Does `logger=[...]` slow training? The same robustft run with and without trackers, ratios from one run.

Each arm is the console script (`python -m robustft`) on the same model, data slice, seed and trainer, with
`trainer.log_every=1` (a metrics.jsonl row at every step: the most a tracker is ever sent) and no checkpoints;
only `logger` differs (default arms: none, and `tensorboard,mlflow` with MLflow's default local SQLite store).
Two figures per arm, medians over `--repeats` interleaved rounds (A B, B A, ...) so drifting machine load hits
every arm alike:

- train examples/s: metrics.json's `train/examples_per_s`, the loop's own timer over every optimizer step,
  which includes handing each row to RunDir and so to the trackers (they batch rows, see robustft/loggers/base.py);
- wall s: the whole command, also the trackers' start (imports; MLflow creates its store) and end;
- CPU s: the CPU time of the whole command (user + system), the figure least moved by other jobs' load;
- tracker CPU ms per row: in this process, `--rows` metrics.jsonl-like rows pushed through the arm's trackers
  (robustft.loggers.base.Trackers, the code RunDir calls), CPU time per row (the process's, so the sender
  thread's too), and that as a share of one training step of the `none` arm (batch size / its examples/s).
  The training thread itself only buffers rows; a tracker's disk or network wait happens on the sender thread.


    python scripts/bench_loggers.py                      # minilm, SST-2, 512 examples, batch 32, 3 rounds
    python scripts/bench_loggers.py --arms none tensorboard,mlflow,wandb --model tiny_random
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_arm(arm: str, args: argparse.Namespace, out: Path) -> tuple[float, float, float]:
    """(train examples/s, wall s, CPU s) of one run of `arm` into `out`."""
    loggers = "[]" if arm == "none" else f"[{arm}]"
    cmd = [sys.executable, "-m", "robustft", f"model={args.model}", "task=sst2",
           f"task.max_train_samples={args.train_examples}", "task.max_eval_samples=64", "trainer.epochs=1",
           f"trainer.batch_size={args.batch_size}", "trainer.log_every=1", "trainer.eval_every=epoch",
           "trainer.save_checkpoints=false", "trainer.precision=fp32", f"logger={loggers}", f"hydra.run.dir={out}"]
    if args.data_dir:
        cmd.append(f"data_dir={args.data_dir}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads((out / "metrics.json").read_text())["train/examples_per_s"]), wall, cpu


def row_cost(arm: str, rows: int, folder: Path) -> float:
    """CPU ms per row of the trackers of `arm`, the main and the sender thread's (their start is not counted: it
    is per run, not per step; their end is, a little in excess)."""
    from omegaconf import OmegaConf

    from robustft.config import CONF_DIR
    from robustft.loggers.base import RunMeta, Trackers, build

    if arm == "none":
        return 0.0
    section = {k: OmegaConf.load(CONF_DIR / "logger" / f"{k}.yaml") for k in arm.split(",")}
    meta = RunMeta("bench/seed=1", "bench", "bench", 1, folder, folder, {"trainer.lr": 1e-4})
    trackers = Trackers(build(section), meta, {"rows": 0}, lambda a, b: [], lambda s: None)
    trackers.open(lambda name: folder / name)
    data = [{"step": i + 1, "epoch": 0, "split": "train", "loss": 0.5 + 1e-4 * i, "lr": 2e-5, "grad_norm": 1.5,
             "examples_per_s": 100.0} for i in range(rows)]
    c0 = time.process_time()  # the whole process: the sender thread's work counts
    for i, row in enumerate(data):
        trackers.log(row, i)
    trackers.close("completed", {}, rows)  # waits for the sender thread
    return 1000 * (time.process_time() - c0) / rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["none", "tensorboard,mlflow"])
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR"))
    p.add_argument("--rows", type=int, default=2000, help="rows for the per-row tracker cost")
    args = p.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {a: [] for a in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for arm in args.arms if r % 2 == 0 else args.arms[::-1]:
                got = run_arm(arm, args, Path(tmp) / f"{arm.replace(',', '+')}-{r}")
                results[arm].append(got)
                print(f"round {r + 1}: {arm}: {got[0]:.1f} ex/s, {got[1]:.1f} s wall, {got[2]:.1f} s CPU", flush=True)
        per_row = {arm: row_cost(arm, args.rows, Path(tmp) / f"rows-{arm.replace(',', '+')}") for arm in args.arms}
    med = {arm: [statistics.median(x[i] for x in got) for i in range(3)] for arm, got in results.items()}
    base = med[args.arms[0]]
    step_ms = 1000 * args.batch_size / base[0]  # one training step of the first arm
    print(f"\n{args.model}, SST-2 {args.train_examples} examples, batch {args.batch_size}, log_every=1, "
          f"{args.threads} thread(s), median of {args.repeats}, load average {os.getloadavg()[0]:.1f} at the end")
    vs = "÷ " + args.arms[0]
    print(f"{'logger':<28} {'train ex/s':>10} {vs:>8} {'wall s':>8} {vs:>8} {'CPU s':>8} {vs:>8} "
          f"{'ms/row':>8} {'of a step':>10}")
    for arm, (ex, wall, cpu) in med.items():
        print(f"{arm:<28} {ex:>10.1f} {ex / base[0]:>8.3f} {wall:>8.1f} {wall / base[1]:>8.3f} {cpu:>8.1f} "
              f"{cpu / base[2]:>8.3f} {per_row[arm]:>8.3f} {per_row[arm] / step_ms:>10.2%}")
    print(f"(a training step of {args.arms[0]}: {step_ms:.0f} ms; ms/row: tracker CPU per metrics.jsonl row, "
          f"{args.rows} rows in this process)")

if __name__ == "__main__":
    main()
