#!/usr/bin/env python
"""Benchmark method=weight_mixup against vanilla fine-tuning: stage-1 step cost, wall time, peak memory.

1. Stage-1 cost per outer step (in this process): the same fixed batches (size --batch-size, drawn from
   the N-example subsample) go through (a) a vanilla step - forward, backward, clipping, AdamW step - on
   the plain model, and (b) a weight_mixup outer step - inner step, validation pass, two finite-difference
   passes, outer AdamW step - on the wrapped model, with D_tr/D_val batches of the same size. Both arms run
   --repeats times, interleaved, and the median time per step is reported with the ratio (b)/(a) (the
   spec's bound is 4: four forward/backward pairs). The phases of (b) are timed too.
2. Whole method (one subprocess per arm, so each peak RSS is its own): `robustft.runner.fit` with the
   same model, task, N examples (vanilla: stress=low_resource with n=N, the rows weight_mixup's
   train_size=N selects), stage-2/vanilla trainer settings (batch --batch-size, 3 epochs, warmup 10%, no
   checkpoints). Reported: wall time of fit(), train time (stage 1 + loop), the peak RSS of each arm
   (ru_maxrss: the whole process, often set by evaluation with its large batches) and the peak RSS
   outside evaluation (training; /proc/self/statm sampled every 20 ms), and weight_mixup / vanilla ratios.
   The arms run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at --mmap-threshold (64 KiB): tensors above it
   are mapped and unmapped one by one, so RSS follows live memory. With glibc's default (0 here) freed
   heap memory stays in RSS, and weight_mixup's long-lived v between activations fragments the heap, so
   the peaks then mostly measure allocator slack. Use --epochs 2 or more: the loop puts the longest batch
   first in every epoch, so in epoch 1 vanilla's largest activations come before its AdamW state exists.

Examples::

    python scripts/bench_weight_mixup.py                # minilm, RTE, N=300, 5 folds x 3 epochs (~15 min on 2 cores)
    python scripts/bench_weight_mixup.py --quick        # N=64, 1 fold x 1 epoch, 1 stage-2 epoch (~2 min)

The machine may be shared: the load average is recorded with every measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench_env import REPO, quiet  # noqa: E402  (offline flags + repo on sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="rte")
    p.add_argument("--train-size", type=int, default=300, help="N (weight_mixup train_size; vanilla low_resource n)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--stage1-epochs", type=float, default=3)
    p.add_argument("--epochs", type=int, default=3, help="stage-2 / vanilla epochs")
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm and repeat (stage-1 cost ratio)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-examples", type=int, default=0, help="validation examples in fit() (0 = all)")
    p.add_argument("--skip-fit", action="store_true", help="only the per-step cost ratio")
    p.add_argument("--skip-step", action="store_true", help="only the whole-run arms")
    p.add_argument("--quick", action="store_true", help="N=64, 1 fold x 1 epoch, 1 stage-2 epoch, 64 eval examples")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--mmap-threshold", type=int, default=65536,
                   help="MALLOC_MMAP_THRESHOLD_ of the whole-run arms, bytes (0 = glibc's dynamic default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default=None, help="GLUE-format data (default: $ROBUSTFT_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default=str(REPO / "bench_out" / "bench_weight_mixup.json"), help="JSON results ('' = none)")
    p.add_argument("--child", choices=["vanilla", "weight_mixup"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.folds, args.stage1_epochs, args.epochs = 64, 1, 1, 1
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 2)
        args.eval_examples = args.eval_examples or 64
    if args.data_dir is None:
        args.data_dir = os.environ.get("ROBUSTFT_DATA_DIR") or str(REPO.parent / "shared" / "data")
    args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder (expected the layout of shared/data)")
    return args


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def overrides(args: argparse.Namespace, arm: str) -> list[str]:
    base = [f"model={args.model}", f"task={args.task}", f"data_dir={args.data_dir}", f"seed={args.seed}",
            f"trainer.batch_size={args.batch_size}", f"trainer.epochs={args.epochs}", "trainer.warmup_ratio=0.1",
            "trainer.precision=fp32", "trainer.save_checkpoints=false", "resume=never", "trainer.log_every=10"]
    if args.eval_examples:
        base.append(f"task.max_eval_samples={args.eval_examples}")
    if arm == "vanilla":
        return [*base, "method=vanilla", "stress=low_resource", f"stress.low_resource.n={args.train_size}"]
    return [*base, "method=weight_mixup", f"method.train_size={args.train_size}", f"method.folds={args.folds}",
            f"method.stage1.epochs={args.stage1_epochs}", f"method.stage1.batch_size={args.batch_size}"]


def compose_cfg(over: list[str]):
    from robustft.cli import compose_config

    return compose_config(over)


# --- 1. per-step cost -----------------------------------------------------------------------------
def step_cost(args: argparse.Namespace, say) -> dict[str, Any]:
    import numpy as np
    import torch
    from hydra.utils import instantiate

    from robustft.data import collate, load_task, tokenize
    from robustft.methods.base import TrainContext, adamw, model_inputs, task_loss
    from robustft.models import load_model, load_tokenizer

    cfg = compose_cfg(overrides(args, "weight_mixup"))
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.data_dir, args.seed)
    method = instantiate(cfg.method)
    torch.manual_seed(args.seed)
    plain = load_model(cfg.model, cfg.task)
    torch.manual_seed(args.seed)
    mixed_model = load_model(cfg.model, cfg.task)
    ctx = TrainContext(task=cfg.task, trainer=cfg.trainer, device=device, seed=args.seed, tokenizer=tokenizer)
    mixed_model = method.setup(mixed_model, ctx)
    stage = method.bilevel  # stage 1
    train = tokenize(method.train_data(data["train"], ctx), tokenizer, cfg.task, int(cfg.trainer.max_length))
    tr, val = stage.fold_split(len(train), 0)
    total = stage.steps_per_fold(len(tr))
    lengths = [len(x) for x in train["input_ids"]]
    padded = {}  # tokens incl. padding in one stage-1 epoch of D_tr, random vs length-grouped batches
    for grouped in (False, True):
        stage._lengths = lengths if grouped else None
        rows = [stage.batch_rows(tr, s, 0, 0) for s in range(math.ceil(len(tr) / args.batch_size))]
        padded["grouped" if grouped else "random"] = sum(max(lengths[i] for i in b) * len(b) for b in rows)
    say(f"  padded D_tr tokens per stage-1 epoch: random batches {padded['random']}, length-grouped "
        f"{padded['grouped']} ({padded['random'] / padded['grouped']:.2f}x fewer)")
    # Timed steps use random batches: a length-grouped D_val batch is unrelated in length to its D_tr
    # batch, so one outer step would not compare with one vanilla step on the D_tr batch.
    stage._lengths = None
    stage.start_fold(mixed_model, 0)

    def mb(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    # What stage 1 holds beyond a vanilla step (the inner AdamW state matches vanilla's). The pretrained
    # non-mixed parameters for the fold resets and the fold sums wait on disk (weight_mixup's DiskCopy).
    buffers = {
        "W0 (the inherent copy)": mb(m.weight0 for m in method.mixed.values()),
        "v (d_W L_val, held through the finite difference)": mb(p for _, p in method.inner_params(mixed_model)),
    }
    say("  stage-1 buffers beyond vanilla (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in buffers.items()))

    def batch(rows):
        return collate(train, rows, tokenizer, cfg.task.is_regression)

    b_tr = [batch(stage.batch_rows(tr, s, 0, 0)) for s in range(args.steps)]
    b_val = [batch(stage.batch_rows(val, s, 0, 1)) for s in range(args.steps)]
    named = [(n, p) for n, p in plain.named_parameters()]
    opt = adamw([{"params": [p for _, p in named], "weight_decay": 0.01}], 2e-5, device)  # the loop's (fused) AdamW
    plain.train()
    mixed_model.train()

    def vanilla_step(b):
        loss = task_loss(plain(**model_inputs(b)).logits, b["labels"], cfg.task.is_regression)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    phases: dict[str, list[float]] = {"inner": [], "val": [], "fd": [], "outer_update": []}

    def outer_step(i):  # stage.outer_step, with its phases timed separately
        t0 = time.perf_counter()
        stage.set_lrs(i, total)
        stage.inner_step(mixed_model, b_tr[i])
        t1 = time.perf_counter()
        alphas, inner = method.alphas(), stage._inner_list
        loss_val = stage.loss(mixed_model, b_val[i])
        grads = torch.autograd.grad(loss_val, alphas + inner, allow_unused=True)
        v = stage.precondition([g if g is not None else torch.zeros_like(p) for g, p in zip(grads[len(alphas):], inner)])
        direct = grads[: len(alphas)]
        del grads
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in v])))
        t2 = time.perf_counter()
        implicit = stage.finite_difference(mixed_model, b_tr[i], v, 0.01 / (norm + 1e-12))
        t3 = time.perf_counter()
        for a, d, h in zip(alphas, direct, implicit):
            a.grad = d - h
        stage.outer_opt.step()
        for m in method.mixed.values():
            m.a1.grad = m.a2.grad = None
            m.clamp_()
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[k].append(dt)

    for i in range(min(2, args.steps)):  # warm-up
        vanilla_step(b_tr[i])
        stage.outer_step(mixed_model, b_tr[i], b_val[i], i, total)
    for k in phases:
        phases[k].clear()
    times: dict[str, list[float]] = {"vanilla": [], "outer": []}
    loads = []
    for r in range(args.repeats):
        order = ("vanilla", "outer") if r % 2 == 0 else ("outer", "vanilla")
        for arm in order:
            loads.append(loadavg())
            t0 = time.perf_counter()
            for i in range(args.steps):
                vanilla_step(b_tr[i]) if arm == "vanilla" else outer_step(i)
            times[arm].append((time.perf_counter() - t0) / args.steps)
        say(f"  repeat {r + 1}: vanilla {times['vanilla'][-1]:.3f} s/step, outer {times['outer'][-1]:.3f} s/step")
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = float(np.mean([int(b["attention_mask"].sum()) for b in b_tr]))
    return {"vanilla_step_s": med["vanilla"], "outer_step_s": med["outer"], "ratio": med["outer"] / med["vanilla"],
            "phases_s": {k: statistics.median(v) for k, v in phases.items()}, "runs": times, "buffers_mb": buffers,
            "batch_size": args.batch_size, "mean_tokens_per_batch": tokens, "padded_tokens_per_epoch": padded,
            "loadavg": loads}


# --- 2. whole method, one subprocess per arm --------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    quiet()
    import threading

    import torch

    import robustft.loop as loop
    import robustft.runner as runner
    from robustft.rundir import RunDir
    from robustft.runner import fit

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_cfg(overrides(args, args.child))
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    state = {"eval": 0, "train_peak": 0.0, "stop": False}
    evaluate = loop.evaluate

    def tagged_evaluate(*a, **k):  # samples taken while evaluating do not count as training memory
        state["eval"] += 1
        try:
            return evaluate(*a, **k)
        finally:
            state["eval"] -= 1

    def sampler() -> None:
        with open("/proc/self/statm") as f:
            while not state["stop"]:
                f.seek(0)
                rss = int(f.read().split()[1]) * page_mb
                if not state["eval"]:
                    state["train_peak"] = max(state["train_peak"], rss)
                time.sleep(0.02)

    loop.evaluate = runner.evaluate = tagged_evaluate
    threading.Thread(target=sampler, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="bench_wm_") as tmp:
        t0 = time.perf_counter()
        m = fit(cfg, RunDir(tmp))
        wall = time.perf_counter() - t0
    state["stop"] = True
    keep = ("train/wall_s", "stage1/wall_s", "stage1/outer_steps", "train/steps", "cost/total_wall_s",
            "cost/total_flops", "cost/train_flops")
    out = {"fit_wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "train_peak_rss_mb": state["train_peak"],
           **{k: m[k] for k in keep if k in m}, "metric": {k: v for k, v in m.items() if k.startswith("validation/")}}
    print("RESULT " + json.dumps(out))


def run_child(args: argparse.Namespace, arm: str, argv: list[str]) -> dict[str, Any]:
    load = loadavg()
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", arm], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} run failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "loadavg": load}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    quiet()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def say(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "child"},
                           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if not args.skip_step:
        say(f"stage-1 cost per outer step: {args.model} {args.task} N={args.train_size} batch {args.batch_size}")
        res["step"] = s = step_cost(args, say)
        say(f"  vanilla step {s['vanilla_step_s']:.3f} s, outer step {s['outer_step_s']:.3f} s -> ratio {s['ratio']:.2f} (bound 4)")
        say("  outer-step phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in s["phases_s"].items()))
    if not args.skip_fit:
        passthrough = [a for a in argv if a not in ("--child", "--skip-step")]
        arms = {}
        for arm in ("vanilla", "weight_mixup"):
            say(f"whole run, {arm} (subprocess) ...")
            arms[arm] = run_child(args, arm, passthrough)
            a = arms[arm]
            say(f"  fit {a['fit_wall_s']:.1f} s, train {a.get('cost/total_wall_s', a['train/wall_s']):.1f} s, "
                f"peak RSS {a['peak_rss_mb']:.0f} MB (training {a['train_peak_rss_mb']:.0f} MB), {a['metric']}")
        v, w = arms["vanilla"], arms["weight_mixup"]
        res["fit"] = arms
        res["fit_ratios"] = {
            "fit_wall": w["fit_wall_s"] / v["fit_wall_s"],
            "train_wall": w["cost/total_wall_s"] / v["cost/total_wall_s"],
            "peak_rss": w["peak_rss_mb"] / v["peak_rss_mb"],
            "peak_rss_delta_mb": w["peak_rss_mb"] - v["peak_rss_mb"],
            "train_peak_rss": w["train_peak_rss_mb"] / v["train_peak_rss_mb"],
            "train_peak_rss_delta_mb": w["train_peak_rss_mb"] - v["train_peak_rss_mb"],
        }
        r = res["fit_ratios"]
        say(f"weight_mixup / vanilla: fit wall {r['fit_wall']:.2f}x, train wall {r['train_wall']:.2f}x, "
            f"peak RSS {r['peak_rss']:.2f}x (+{r['peak_rss_delta_mb']:.0f} MB), training peak RSS "
            f"{r['train_peak_rss']:.2f}x (+{r['train_peak_rss_delta_mb']:.0f} MB)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
        say(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
