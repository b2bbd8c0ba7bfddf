#!/usr/bin/env python
"""Data-parallel throughput on CPUs, in one run: 2 ranks x 1 thread (`torchrun --nproc_per_node=2 -m
robustft`, gloo) against 1 process x 2 threads (`python -m robustft`), for vanilla training and for the
TextFooler evaluator.

``train``
    Vanilla fine-tuning at the same global batch, steps, data slice, precision and seed. The number is the
    run's own `train/examples_per_s` (metrics.json): global examples over rank 0's training time, from
    collation to `zero_grad`, evaluation and start-up excluded.
``textfooler``
    An evaluation-only run (`train=false ckpt_path=<checkpoint>`) attacking `--attack-examples`
    dev examples (drawn with task.split_seed) with `robustness=[textfooler]` (query budget `--query-budget`, experiment=quickstart's 300).
    The numbers are the evaluator's own `textfooler/examples_per_s` and `textfooler/queries_per_s`: the
    attack loop only, data and model loading excluded. Under DDP the ranks shard every scoring batch
    (robustft/robustness/base.py, ShardedPredictor) and the results are meant to be bit-identical to one
    process: the bench checks that every run's non-timing textfooler metrics and samples.jsonl equal the
    first single-process run's, and prints whether they do. The checkpoint comes from `--ckpt` (a run
    directory or checkpoint folder of the same --model/--task) or, by default, from one short untimed
    single-process training run (`--ckpt-train-examples`) the bench makes first in its temp dir.

Every arm is the real CLI in a fresh process. Arms alternate (A B B A ...) so a drift in machine load hits
both alike; the median of `--repeats` runs is reported, with the load average before each run.

GPUs (NCCL) cannot be measured on these machines; the code path is the same (robustft/loop.py,
robustft/robustness/base.py).

Examples::

    python scripts/bench_ddp.py                       # minilm: training (1,024 examples) and textfooler (50)
    python scripts/bench_ddp.py --benches textfooler --attack-examples 100 --repeats 3
    python scripts/bench_ddp.py --model tiny_random --train-examples 128 --attack-examples 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {"ddp_2x1": "2 ranks x 1 thread (torchrun, gloo)", "single_1x2": "1 process x 2 threads"}
BENCHES = ("train", "textfooler")
TIMING = ("examples_per_s", "queries_per_s")  # the only textfooler metrics allowed to differ between runs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benches", nargs="+", choices=BENCHES, default=list(BENCHES), help="what to time (default: both)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--train-examples", type=int, default=1024, help="training bench: examples per run")
    p.add_argument("--batch-size", type=int, default=32, help="training bench: the global batch (both arms)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--attack-examples", type=int, default=50, help="textfooler bench: dev examples attacked")
    p.add_argument("--query-budget", type=int, default=300, help="textfooler bench: model queries per example")
    p.add_argument("--ckpt", default=None, help="textfooler bench: checkpoint to attack (run dir or checkpoint "
                   "folder of --model/--task; default: train one first)")
    p.add_argument("--ckpt-train-examples", type=int, default=2000,
                   help="textfooler bench: examples of the one untimed training run that makes the checkpoint")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args()
    if min(args.repeats, args.train_examples, args.batch_size, args.attack_examples, args.query_budget,
           args.ckpt_train_examples) < 1:
        p.error("--repeats, --train-examples, --batch-size, --attack-examples, --query-budget and "
                "--ckpt-train-examples must be >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [f"model={args.model}", f"task={args.task}", f"data_dir={args.data_dir}",
            f"trainer.max_length={args.max_length}", "trainer.precision=fp32", "trainer.log_every=1000", "seed=1",
            f"hydra.run.dir={run_dir}"]


def launch(arm: str, overrides: list[str], run_dir: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """The CLI as `arm` in a fresh process; (its metrics.json, the 1-minute load average before it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1" if arm == "ddp_2x1" else "2")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"] \
        if arm == "ddp_2x1" else []
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, *launcher, "-m", "robustft", *common(args, run_dir), *overrides],
                          env=env, text=True, capture_output=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text()), load


def run_train(arm: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """One training run of `arm`; its metrics.json numbers."""
    m, load = launch(arm, [f"task.max_train_samples={args.train_examples}", "task.max_eval_samples=32",
                           "trainer.epochs=1", f"trainer.batch_size={args.batch_size}",
                           "trainer.save_checkpoints=false"], run_dir, args)
    res = {"examples_per_s": m["train/examples_per_s"], "examples": m["train/examples"], "steps": m["train/steps"],
           "wall_s": m["train/wall_s"], "load_before": load}
    res["line"] = f"{res['examples_per_s']:7.1f} ex/s  ({res['examples']} examples, {res['steps']} steps"
    return res


def run_textfooler(arm: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """One evaluation-only textfooler run of `arm` on the checkpoint; its rates, metrics and samples hash."""
    # task.max_eval_samples also caps the split the attack reads: keep it at the attacked count
    m, load = launch(arm, ["train=false", f"ckpt_path={args.ckpt}", f"task.max_eval_samples={args.attack_examples}",
                           "robustness=[textfooler]", f"robustness.textfooler.num_examples={args.attack_examples}",
                           f"robustness.textfooler.goal.query_budget={args.query_budget}",
                           "robustness.textfooler.log_every=0"], run_dir, args)
    metrics = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("textfooler/")}
    samples = (run_dir / "eval" / "textfooler" / "samples.jsonl").read_bytes()
    res = {"examples_per_s": metrics["examples_per_s"], "queries_per_s": metrics["queries_per_s"],
           "metrics": {k: v for k, v in metrics.items() if k not in TIMING},
           "samples_sha256": hashlib.sha256(samples).hexdigest(), "load_before": load}
    res["line"] = (f"{res['examples_per_s']:7.2f} ex/s, {res['queries_per_s']:7.1f} queries/s  "
                   f"(acc_under_attack {res['metrics']['acc_under_attack']:.3f}")
    return res


def make_checkpoint(args: argparse.Namespace, tmp: Path) -> str:
    """One untimed single-process training run whose best checkpoint the textfooler arms attack."""
    run_dir = tmp / "ckpt_run"
    m, _ = launch("single_1x2", [f"task.max_train_samples={args.ckpt_train_examples}", "trainer.epochs=1",
                                 "trainer.save_checkpoints=true"], run_dir, args)
    print(f"checkpoint: {args.model} trained on {args.ckpt_train_examples} {args.task} examples "
          f"(dev accuracy {m.get('validation/accuracy', float('nan')):.3f}) -> {run_dir}", flush=True)
    return str(run_dir)


def alternate(name: str, run: Callable[[str, argparse.Namespace, Path], dict], args: argparse.Namespace,
              tmp: Path) -> dict[str, list[dict]]:
    """`--repeats` runs of each arm, A B B A ...; each printed as it finishes."""
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    order = list(ARMS)
    for r in range(args.repeats):
        for arm in order if r % 2 == 0 else order[::-1]:
            res = run(arm, args, tmp / f"{name}_{arm}_{r}")
            runs[arm].append(res)
            print(f"  {name} {arm:11s} run {r + 1}: {res.pop('line')}, load {res['load_before']:.1f})", flush=True)
    return runs


def same(a: object, b: object) -> bool:
    """Equal to the last bit, NaN equal to NaN (json writes floats as their shortest exact repr)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def summary(runs: dict[str, list[dict]], key: str, unit: str) -> dict[str, float]:
    median = {arm: statistics.median(x[key] for x in runs[arm]) for arm in ARMS}
    for arm, what in ARMS.items():
        print(f"  {what:38s} {median[arm]:8.2f} {unit} (median of {len(runs[arm])}; runs "
              + " ".join(f"{x[key]:.2f}" for x in runs[arm]) + ")")
    ratio = median["ddp_2x1"] / median["single_1x2"] if median["single_1x2"] else math.nan
    print(f"  ratio ddp_2x1 / single_1x2: {ratio:.2f}")
    return median


def main() -> None:
    args = parse_args()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        if "train" in args.benches:
            results["train"] = {"runs": alternate("train", run_train, args, Path(tmp))}
        if "textfooler" in args.benches:
            results["checkpoint"] = args.ckpt or f"trained here on {args.ckpt_train_examples} examples (temp dir)"
            args.ckpt = args.ckpt or make_checkpoint(args, Path(tmp))
            results["textfooler"] = {"runs": alternate("textfooler", run_textfooler, args, Path(tmp))}
    print(f"\n{args.model} {args.task}, max_length {args.max_length}, fp32, {os.cpu_count()} CPUs")
    if "train" in results:
        print(f"training: vanilla, {args.train_examples} examples, global batch {args.batch_size}")
        results["train"]["median_examples_per_s"] = summary(results["train"]["runs"], "examples_per_s", "ex/s")
    if "textfooler" in results:
        tf = results["textfooler"]
        print(f"textfooler: {args.attack_examples} dev examples, query budget {args.query_budget}, "
              f"checkpoint {results['checkpoint']}")
        tf["median_examples_per_s"] = summary(tf["runs"], "examples_per_s", "ex/s")
        tf["median_queries_per_s"] = summary(tf["runs"], "queries_per_s", "queries/s")
        ref = tf["runs"]["single_1x2"][0]
        tf["identical"] = all(same(x["metrics"], ref["metrics"]) and x["samples_sha256"] == ref["samples_sha256"]
                              for arm in ARMS for x in tf["runs"][arm])
        print("  textfooler results of every run (metrics except examples_per_s/queries_per_s, samples.jsonl): "
              + ("identical, DDP == single process" if tf["identical"] else "DIFFER between runs"))
        print("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in ref["metrics"].items()))
    print("GPU (NCCL) not measured: no GPU on this machine.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if "textfooler" in results and not results["textfooler"]["identical"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
