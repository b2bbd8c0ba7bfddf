#!/usr/bin/env python
"""Attack throughput (examples/s, queries/s) on a real minilm SST-2 model: batched vs one-by-one.

Runs one attack composition from conf/robustness/ (default textfooler) over ``--n`` SST-2 dev
examples (the sample drawn with task.split_seed) in three arms, on the same model, examples, candidates, constraints and budget:

``batched``
    robustft's attack as shipped: ``--concurrency`` examples attacked side by side, the pending
    requests of all of them (each one's candidates for one position, or its importance probes) merged
    into one ``Predictor`` call (length-sorted batches of ``--batch-size``).
``per_position``
    One example at a time, all candidates of one position in one forward call (TextAttack's batching).
``one_by_one``
    One example at a time, every text in its own forward call (one candidate per forward), the way a
    naive loop queries the model.

It prints the throughputs, the ratios to ``one_by_one``, and whether the arms produced the same
adversarial texts (they should: only padding differs, so at most float-level ties can flip a choice).

TextAttack itself is not compared: every TextAttack release pins an old ``transformers`` (<4.x era
APIs) and TensorFlow Hub for its USE constraint, neither of which installs beside this project's
transformers 5.x offline, so the baseline is our own unbatched loop.

Without ``--ckpt`` a quick model is trained first (``fit`` with task.max_train_samples=2000,
trainer.epochs=1, about 0.79 dev accuracy) into ``--out``/model. The machine may be shared: the load
average is printed, torch's thread count is set explicitly (``--threads``; oversubscribed OpenMP
threads on a busy 2-core machine slowed small forwards by >10x in our measurements), and the process
CPU time is reported beside wall time (with one thread it is the steadier measure under contention).

Examples::

    python scripts/bench_attack.py --n 30                                   # trains, then benches
    python scripts/bench_attack.py --ckpt outputs/sst2/vanilla/<run> --n 100 --attack typo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class OneByOne:
    """The Predictor interface, but every text in its own forward call (the unbatched baseline)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.unk_token = inner.unk_token

    @property
    def queries(self) -> int:
        return self.inner.queries

    def probs(self, texts):
        return np.concatenate([self.inner.probs([t]) for t in texts]) if texts else self.inner.probs([])


def compose(overrides: list[str]):
    from robustft.cli import compose_config

    return compose_config(overrides)


def train_quick_model(out: Path, data_dir: str) -> Path:
    from robustft.rundir import RunDir
    from robustft.runner import fit

    run_dir = out / "model"
    if (run_dir / "checkpoints" / "best").is_dir():
        return run_dir
    cfg = compose([f"data_dir={data_dir}", "task=sst2", "task.max_train_samples=2000", "trainer.epochs=1"])
    run = RunDir(run_dir)
    run.start(seed=int(cfg.seed), task="sst2", method="vanilla", model="minilm")
    metrics = fit(cfg, run)
    run.finish("completed")
    print(f"trained quick model: dev accuracy {metrics['validation/accuracy']:.4f} ({run_dir})")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="run dir or checkpoint folder of an SST-2 model (default: train one)")
    ap.add_argument("--attack", default="textfooler", help="conf/robustness/<name>.yaml (textfooler, pwws, typo)")
    ap.add_argument("--n", type=int, default=50, help="dev examples to attack")
    ap.add_argument("--budget", type=int, default=None, help="override the query budget")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32, help="examples side by side in the batched arm")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(REPO / "bench_out" / "attack"))
    ap.add_argument("--skip-baseline", action="store_true", help="only the batched arm")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from robustft.methods.base import Method
    from robustft.models import load_model, load_tokenizer
    from robustft.predict import Predictor
    from robustft.robustness.base import EvalContext, build_evaluators
    from robustft.runner import resolve_ckpt_path
    from robustft.runtime import autocast_dtype

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_ckpt_path(args.ckpt or str(train_quick_model(out, args.data_dir)))
    over = [f"data_dir={args.data_dir}", "task=sst2", f"robustness=[{args.attack}]",
            f"robustness.{args.attack}.num_examples={args.n}", f"robustness.{args.attack}.log_every=0"]
    if args.budget:
        over.append(f"robustness.{args.attack}.goal.query_budget={args.budget}")
    cfg = compose(over)
    device = torch.device("cpu")
    amp = autocast_dtype(device, args.precision)
    tokenizer = load_tokenizer(cfg.model, ckpt)
    model = load_model(cfg.model, cfg.task, ckpt_path=ckpt).to(device).eval()
    data_dir = Path(args.data_dir)

    def arm(name: str, warm_up: bool = False) -> dict[str, Any]:
        (ev,) = build_evaluators(cfg)
        ev.concurrency = args.concurrency if name == "batched" else 1
        if warm_up:
            ev.num_examples = min(5, args.n)
        predictor = Predictor(model, tokenizer, Method(name="vanilla"), device, amp, int(cfg.trainer.max_length), args.batch_size)
        target = OneByOne(predictor) if name == "one_by_one" else predictor
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        metrics, records = ev.evaluate(target, EvalContext(cfg.task, data_dir, int(cfg.seed)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        queries = sum(r["queries"] for r in records)
        res = {"arm": name, "wall_s": wall, "cpu_s": cpu, "examples_per_s": len(records) / wall,
               "queries": queries, "queries_per_s": queries / wall, "examples_per_cpu_s": len(records) / cpu,
               "load_avg_1m": load, "metrics": metrics, "perturbed": [r["perturbed"] for r in records]}
        print(f"{'(warm-up)' if warm_up else name:>12}: {len(records)} examples, {queries} queries in {wall:.1f}s wall / {cpu:.1f}s CPU -> "
              f"{res['examples_per_s']:.2f} ex/s, {res['queries_per_s']:.1f} queries/s (load {load:.1f}); "
              f"clean_acc {metrics['clean_acc']:.3f} acc_under_attack {metrics['acc_under_attack']:.3f}")
        return res

    print(f"attack={args.attack} n={args.n} threads={args.threads} precision={args.precision} ckpt={ckpt}")
    arm("batched", warm_up=True)  # tokenizer, allocator, resource files; not counted
    arms = ["batched"] if args.skip_baseline else ["batched", "per_position", "one_by_one"]
    result: dict[str, Any] = {"args": vars(args)}
    for name in arms:
        result[name] = arm(name)
    for name in arms[:-1] if len(arms) > 1 else []:
        ratio = result[name]["examples_per_s"] / result["one_by_one"]["examples_per_s"]
        cpu_ratio = result["one_by_one"]["cpu_s"] / result[name]["cpu_s"]
        same = sum(a == b for a, b in zip(result[name]["perturbed"], result["one_by_one"]["perturbed"]))
        print(f"speed-up {name} / one_by_one: {ratio:.2f}x examples/s wall, {cpu_ratio:.2f}x CPU time; "
              f"identical adversarial texts {same}/{len(result[name]['perturbed'])}")
        result[f"ratio_{name}"], result[f"cpu_ratio_{name}"], result[f"identical_{name}"] = ratio, cpu_ratio, same
    for name in arms:
        result[name].pop("perturbed", None)
    path = out / f"bench_attack_{args.attack}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
