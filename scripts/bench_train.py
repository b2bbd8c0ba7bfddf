#!/usr/bin/env python
"""Benchmark robustft's training loop against Hugging Face `Trainer` (examples/s), in one run.

Arms, all on the same model, the same slice of the real training data, batch size, precision, number of
optimizer steps, lr schedule (linear, 6% warmup), weight decay, grad clipping and seed:

``robustft``
    The real code path: ``robustft.runner.fit`` on a composed config (vanilla method, dynamic padding,
    ``trainer.group_by_length=true``, no checkpoints). Its own ``train/examples_per_s`` is used; that
    timer covers every optimizer step from collation to ``zero_grad`` and excludes evaluation.
``hf_dynamic``
    ``Trainer`` with ``DataCollatorWithPadding`` and ``train_sampling_strategy="group_by_length"``
    (transformers 5.x's name for ``group_by_length=True``): the same padding strategy as robustft.
``hf_maxlen``
    ``Trainer`` as ``examples/pytorch/text-classification/run_glue.py`` runs it by default: every example
    padded to ``max_seq_length=128`` at tokenization, ``default_data_collator``, random sampling.

The Trainer arms are timed by a callback from ``on_train_begin`` (after dataloader, optimizer and
scheduler set-up) to the last ``on_step_end``, so data loading and Trainer's per-step bookkeeping count,
set-up does not. No evaluation, no saving, no reporting, no tqdm, no dataloader workers. Trainer keeps its
default optimizer (``--hf-optim default``: fused AdamW on torch >= 2.8, also on CPU); robustft uses
``torch.optim.AdamW`` with its CPU default (foreach). ``--hf-optim adamw_torch`` makes them identical.

Every arm is warmed up once (a few steps) before timing; then the arms run ``--repeats`` times,
interleaved (ABC, CBA, ABC, ...) so a drift in machine load hits every arm alike, and the median is
reported. Ratios are robustft's median over each Trainer arm's median, all from this run.

Evaluation examples/s (robustft's ``evaluate`` on the validation split, length-sorted batches of
``--eval-batch-size``) is measured in fp32 and in bf16 autocast, interleaved the same way.

``--device`` (auto | cpu | cuda | cuda:N; auto = cuda when available, else cpu) is where every arm runs,
robustft's loop and the Trainer arms alike. On CUDA the bench makes only that one GPU visible
(``CUDA_VISIBLE_DEVICES``, set before CUDA initialises): Trainer always takes ``cuda:0`` and, with several
GPUs visible, wraps the model in ``nn.DataParallel`` (per-device batch x GPUs), which would not be the same
batch on the same hardware. ``cpu`` hides the GPUs and sets Trainer's ``use_cpu``. A device this machine
does not have is a one-line error.

An arm the device cannot run (bf16 autocast on a CPU without AVX512-BF16 or AMX, e.g. AMD EPYC without
AVX512) is skipped, and its table row says so (``skipped: bf16 not supported on this CPU``).

Examples::

    python scripts/bench_train.py                      # sst2 + rte, fp32, ~10 min on 2 cores
    python scripts/bench_train.py --quick              # ~1 min
    python scripts/bench_train.py --tasks rte --precision bf16 --repeats 3 --out bench_out/rte_bf16.json
    python scripts/bench_train.py --device cuda:1      # on a GPU machine: robustft vs Trainer on GPU 1

The machine may be shared: the load average is recorded before every timed run (JSON) and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench_device import environment, robustft_optimizer, select_device, unsupported
from _bench_env import REPO, quiet  # noqa: E402  (offline flags + repo on sys.path)
from _bench_hf_trainer import run_trainer

ARMS = ("robustft", "hf_dynamic", "hf_maxlen")
DEFAULT_EXAMPLES = {"sst2": 1024, "rte": 256}  # RTE pairs average ~67 tokens (SST-2 ~13): fewer of them
QUICK_EXAMPLES = {"sst2": 128, "rte": 64}
TARGETS = {"hf_maxlen": 1.5, "hf_dynamic": 1.0}  # robustft / arm must reach at least this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="GLUE tasks (robustft task names)")
    p.add_argument("--model", default="minilm", help="robustft model config (default: the embedded minilm)")
    p.add_argument("--train-examples", type=int, default=None,
                   help=f"training slice per task (default {DEFAULT_EXAMPLES}, other tasks 512; --quick {QUICK_EXAMPLES})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per timed run (0 = --epochs over the slice)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="training precision for every arm (auto = what robustft's trainer.precision=auto picks here)")
    p.add_argument("--max-length", type=int, default=128, help="truncation for all arms; padding length of hf_maxlen")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per arm (interleaved); the median is reported")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up run of each arm")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--hf-optim", default="default",
                   help="Trainer optim (default: Trainer's own default; adamw_torch = robustft's optimizer)")
    p.add_argument("--eval-examples", type=int, default=None, help="validation examples for the eval timing (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--eval-repeats", type=int, default=None, help="eval timings per precision (default: --repeats)")
    p.add_argument("--skip-eval", action="store_true", help="do not time evaluation")
    p.add_argument("--quick", action="store_true", help="small slices and eval sets (~1 min)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N: where every arm runs")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default=None, help="GLUE-format data (default: $ROBUSTFT_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default=str(REPO / "bench_out" / "bench_train.json"), help="JSON results file ('' = none)")
    args = p.parse_args(argv)
    if args.quick:
        if args.eval_examples is None:
            args.eval_examples = 64
        args.warmup_steps = min(args.warmup_steps, 2)
    if args.data_dir is None:
        args.data_dir = os.environ.get("ROBUSTFT_DATA_DIR") or str(REPO.parent / "shared" / "data")
    args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder (expected the layout of shared/data)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    if args.eval_repeats is None:
        args.eval_repeats = args.repeats
    if args.repeats < 1 or args.batch_size < 1 or args.epochs < 1:
        p.error("--repeats, --batch-size and --epochs must be >= 1")
    return args


def compose_cfg(overrides: list[str]):
    from robustft.cli import compose_config

    return compose_config(overrides)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
class Bench:
    """Everything one task needs: config, tokenizer, the identical data slice, and the three arms."""

    def __init__(self, task: str, n_train: int, args: argparse.Namespace, precision: str) -> None:
        from robustft.data import load_task, tokenize
        from robustft.models import load_tokenizer

        self.task_name, self.args, self.precision = task, args, precision
        self.bs, self.seed = args.batch_size, args.seed
        self.base = [f"model={args.model}", f"task={task}", f"data_dir={args.data_dir}", f"seed={args.seed}",
                     f"task.max_train_samples={n_train}", f"trainer.batch_size={self.bs}",
                     f"trainer.max_length={args.max_length}", f"trainer.precision={precision}",
                     "trainer.grad_accum=1", "trainer.group_by_length=true", "trainer.save_checkpoints=false",
                     f"trainer.device={args.run_device}", "resume=never"]
        self.cfg = compose_cfg(self.base)
        tcfg = self.cfg.trainer
        self.lr, self.weight_decay = float(tcfg.lr), float(tcfg.weight_decay)
        self.warmup_ratio, self.max_grad_norm = float(tcfg.warmup_ratio), float(tcfg.max_grad_norm)
        self.tokenizer = load_tokenizer(self.cfg.model)
        data = load_task(self.cfg.task, self.cfg.data_dir, self.seed)  # the slice fit() trains on
        self.raw_train = data["train"]
        self.n_train = len(self.raw_train)
        n_batches = math.ceil(self.n_train / self.bs)
        self.steps = args.steps if args.steps > 0 else args.epochs * n_batches
        self.train_dyn = tokenize(self.raw_train, self.tokenizer, self.cfg.task, args.max_length).with_format(None)
        fields = list(self.cfg.task.text_fields)
        self.train_max = self.raw_train.map(  # run_glue.py's preprocessing with pad_to_max_length=True
            lambda b: self.tokenizer(*[b[f] for f in fields], padding="max_length", max_length=args.max_length,
                                     truncation=True),
            batched=True, remove_columns=[c for c in self.raw_train.column_names if c not in ("idx", "label")])
        self.validation = tokenize(data["validation"], self.tokenizer, self.cfg.task, args.max_length)
        if args.eval_examples:
            self.validation = self.validation.select(range(min(args.eval_examples, len(self.validation))))
        lengths = [len(x) for x in self.train_dyn["input_ids"]]
        self.mean_len = sum(lengths) / len(lengths)
        self.truncated = sum(n >= args.max_length for n in lengths) / len(lengths)

    # --- robustft ---------------------------------------------------------------------------------
    def run_robustft(self, steps: int) -> dict[str, Any]:
        from robustft.rundir import RunDir
        from robustft.runner import fit

        cfg = compose_cfg([*self.base, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                           f"trainer.log_every={steps}", f"trainer.save_every={steps + 1}",
                           "task.max_eval_samples=16"])  # fit's own (untimed) eval: keep it short
        with tempfile.TemporaryDirectory(prefix="bench_rft_") as tmp:
            m = fit(cfg, RunDir(tmp))
        ex = int(m["train/examples"])
        return {"examples_per_s": float(m["train/examples_per_s"]), "examples": ex, "steps": int(m["train/steps"]),
                "time_s": float(m["train/wall_s"]), "real_tokens": int(m["cost/train_tokens"]),
                "padded_tokens": self.robustft_padded_tokens(steps)}

    def robustft_padded_tokens(self, steps: int) -> int:
        """Tokens robustft's batches hold after padding (its batch order is a pure function of seed, epoch)."""
        from robustft.data import epoch_batches

        lengths = [len(x) for x in self.train_dyn["input_ids"]]
        total, epoch, done = 0, 0, 0
        while done < steps:
            for rows in epoch_batches(self.train_dyn.with_format("python"), self.bs, self.seed, epoch, True):
                total += len(rows) * max(lengths[i] for i in rows)
                done += 1
                if done == steps:
                    break
            epoch += 1
        return total

    def run(self, arm: str, steps: int) -> dict[str, Any]:
        return self.run_robustft(steps) if arm == "robustft" else run_trainer(self, arm, steps)

    # --- evaluation -------------------------------------------------------------------------------
    def eval_speed(self, precision: str, ds=None) -> float:
        from robustft.methods.vanilla import Vanilla
        from robustft.models import load_model
        from robustft.predict import evaluate
        from robustft.runtime import autocast_dtype

        device = bench_device(self.args)
        amp = autocast_dtype(device, precision)
        if precision == "bf16" and amp is None:  # callers skip such arms (unsupported()); never time fp32 as bf16
            raise RuntimeError(unsupported(precision, device))
        model = self._eval_model = getattr(self, "_eval_model", None) or load_model(self.cfg.model, self.cfg.task).to(device)
        metrics, _ = evaluate(model, Vanilla(name="vanilla"), ds if ds is not None else self.validation, self.tokenizer,
                              self.cfg.task, self.args.eval_batch_size, device, amp)
        return float(metrics["examples_per_s"])


def bench_device(args: argparse.Namespace):
    import torch

    return torch.device(args.run_device)


# --------------------------------------------------------------------------------------------------
def interleaved(items: list[str], repeats: int) -> list[tuple[int, str]]:
    """ABC, CBA, ABC, ...: every item sees early and late positions alike (cancels a linear drift)."""
    order: list[tuple[int, str]] = []
    for r in range(repeats):
        order += [(r, a) for a in (items if r % 2 == 0 else items[::-1])]
    return order


def bench_task(task: str, args: argparse.Namespace, precision: str, say) -> dict[str, Any]:
    n = args.train_examples or (QUICK_EXAMPLES if args.quick else DEFAULT_EXAMPLES).get(task, 128 if args.quick else 512)
    b = Bench(task, n, args, precision)
    say(f"[bold]{task}[/]: {b.n_train} train examples (mean {b.mean_len:.1f} tokens, {b.truncated:.0%} truncated at "
        f"{args.max_length}), {b.steps} steps of {b.bs}, {precision}; eval on {len(b.validation)} validation examples")
    res: dict[str, Any] = {"n_train": b.n_train, "steps": b.steps, "mean_tokens": b.mean_len}
    t_task = time.perf_counter()
    reason = unsupported(precision, bench_device(args))
    if reason:  # every training arm runs in `precision`: none can run here
        res.update(runs={}, median={}, skipped={a: reason for a in args.arms})
        say(f"  training arms skipped: {reason}", style="yellow")
    else:
        res.update(bench_training(b, args, say))
    res["train_bench_s"] = time.perf_counter() - t_task
    if not args.skip_eval:
        t0 = time.perf_counter()
        res["eval"] = bench_eval(b, args)
        res["eval_bench_s"] = time.perf_counter() - t0
        say("  eval: " + ", ".join(f"{p} {v:.1f} ex/s" for p, v in res["eval"]["median"].items())
            + "".join(f", {p} skipped ({why})" for p, why in res["eval"]["skipped"].items())
            + f" ({res['eval_bench_s']:.1f}s)", style="dim")
    return res


def bench_training(b: Bench, args: argparse.Namespace, say) -> dict[str, Any]:
    """Warm up every training arm, time them interleaved; medians, tokens per example and robustft's ratios."""
    res: dict[str, Any] = {"runs": {a: [] for a in args.arms}, "skipped": {}}
    for arm in args.arms:  # warm-up: first-call costs (oneDNN primitives, lazy imports, allocator) stay out
        t0 = time.perf_counter()
        b.run(arm, max(1, min(args.warmup_steps, b.steps)))
        say(f"  warm-up {arm}: {time.perf_counter() - t0:.1f}s", style="dim")
    for rep, arm in interleaved(list(args.arms), args.repeats):
        load = loadavg()
        r = b.run(arm, b.steps)
        r.update(rep=rep, loadavg_before=load)
        res["runs"][arm].append(r)
        say(f"  {arm} #{rep + 1}: {r['examples_per_s']:.1f} ex/s ({r['time_s']:.1f}s, load {load})", style="dim")
    res["median"] = {a: statistics.median(r["examples_per_s"] for r in runs) for a, runs in res["runs"].items()}
    res["padded_tokens_per_example"] = {a: runs[0]["padded_tokens"] / runs[0]["examples"] for a, runs in res["runs"].items()}
    res["real_tokens_per_example"] = {a: runs[0]["real_tokens"] / runs[0]["examples"] for a, runs in res["runs"].items()}
    if "robustft" in res["median"]:
        res["ratios"], res["paired_ratios"] = {}, {}
        for arm in [a for a in args.arms if a != "robustft"]:
            res["ratios"][arm] = res["median"]["robustft"] / res["median"][arm]
            res["paired_ratios"][arm] = [x["examples_per_s"] / y["examples_per_s"]
                                         for x, y in zip(res["runs"]["robustft"], res["runs"][arm])]
    return res


def bench_eval(b: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluation examples/s in fp32 and bf16 autocast, interleaved; a precision the device lacks is skipped."""
    skipped = {p: why for p in ("fp32", "bf16") if (why := unsupported(p, bench_device(args)))}
    precisions = [p for p in ("fp32", "bf16") if p not in skipped]
    warm = b.validation.select(range(min(len(b.validation), args.eval_batch_size)))
    for prec in precisions:
        b.eval_speed(prec, warm)
    evals: dict[str, list[float]] = {p: [] for p in precisions}
    for _, prec in interleaved(precisions, max(2, args.eval_repeats)):
        evals[prec].append(b.eval_speed(prec))
    out: dict[str, Any] = {"n": len(b.validation), "batch_size": args.eval_batch_size, "runs": evals,
                           "median": {p: statistics.median(v) for p, v in evals.items()}, "skipped": skipped}
    if not skipped:
        out["bf16_over_fp32"] = out["median"]["bf16"] / out["median"]["fp32"]
    return out


def report(results: dict[str, Any], console) -> None:
    from rich.table import Table

    env = results["environment"]
    t = Table(title=f"Training examples/s — {results['model']}, batch {results['batch_size']}, {env['precision']}, "
                    f"median of {results['repeats']} interleaved runs")
    for col, just in [("task", "left"), ("arm", "left"), ("ex/s (median)", "right"), ("runs", "right"),
                      ("steps", "right"), ("padded tok/ex", "right"), ("real tok/ex", "right"), ("robustft ÷ arm", "right"),
                      ("paired ratios", "right"), ("target", "left")]:
        t.add_column(col, justify=just)
    for task, res in results["tasks"].items():
        for arm, runs in res["runs"].items():
            ratio = res.get("ratios", {}).get(arm)
            target = TARGETS.get(arm)
            verdict = ""
            if ratio is not None and target is not None:
                ok = ratio >= target
                verdict = f"[{'green' if ok else 'red'}]≥{target:.1f}x {'ok' if ok else 'MISSED'}[/]"
            t.add_row(task, arm, f"{res['median'][arm]:.1f}", " ".join(f"{r['examples_per_s']:.1f}" for r in runs),
                      str(runs[0]["steps"]), f"{res['padded_tokens_per_example'][arm]:.1f}",
                      f"{res['real_tokens_per_example'][arm]:.1f}",
                      "" if ratio is None else f"{ratio:.2f}x",
                      "" if ratio is None else " ".join(f"{x:.2f}" for x in res["paired_ratios"][arm]), verdict)
        for arm, why in res.get("skipped", {}).items():
            t.add_row(task, arm, f"[yellow]skipped: {why}[/]", *[""] * 7)
        t.add_section()
    console.print(t)
    if any("eval" in r for r in results["tasks"].values()):
        e = Table(title="Evaluation examples/s (robustft evaluate, length-sorted batches)")
        for col in ("task", "examples", "batch", "fp32", "bf16 autocast", "bf16 ÷ fp32", "runs fp32 | bf16"):
            e.add_column(col, justify="left" if col == "task" else "right")
        for task, res in results["tasks"].items():
            if "eval" not in res:
                continue
            ev = res["eval"]
            cells = {p: f"{ev['median'][p]:.1f}" if p in ev["median"] else f"[yellow]skipped: {ev['skipped'][p]}[/]"
                     for p in ("fp32", "bf16")}
            ratio = f"{ev['bf16_over_fp32']:.2f}x" if "bf16_over_fp32" in ev else ""
            e.add_row(task, str(ev["n"]), str(ev["batch_size"]), cells["fp32"], cells["bf16"], ratio,
                      " | ".join(" ".join(f"{x:.0f}" for x in ev["runs"][p]) for p in ev["runs"]))
        console.print(e)
    where = f"{env['gpu']} (CUDA_VISIBLE_DEVICES={env['cuda_visible_devices']})" if env["gpu"] else "cpu"
    console.print(f"[dim]device {where}; torch {env['torch']}, transformers {env['transformers']}, {env['cores']} cores, "
                  f"{env['torch_threads']} torch threads, avx512_bf16={env['avx512_bf16']}, amx={env['amx_tile']}; "
                  f"optimizer: robustft {results.get('robustft_optim')}, Trainer {results.get('hf_optim_resolved')}; load average {results['loadavg_start']} → {results['loadavg_end']}; "
                  f"total {results['total_s']:.0f}s wall, {results['cpu_s']:.0f}s CPU[/]")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.run_device = select_device(args.device)  # before anything touches CUDA
    quiet()
    import torch
    from rich.console import Console

    from robustft.runtime import autocast_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # files/pipes: do not wrap the table
    if (loadavg() or 0) > (os.cpu_count() or 1):
        console.print(f"[yellow]warning: load average {loadavg()} exceeds {os.cpu_count()} cores: other jobs share the CPU, "
                      "so absolute numbers are low and noisy (ratios are interleaved); with oversubscribed cores, "
                      "--threads 1 avoids OpenMP barrier stalls that swamp the compute[/]")

    def say(msg: str, style: str | None = None) -> None:
        console.print(msg, style=style, highlight=False)

    device = bench_device(args)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if autocast_dtype(device, "auto") is not None else "fp32"

    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "model": args.model, "batch_size": args.batch_size, "repeats": args.repeats, "max_length": args.max_length,
        "seed": args.seed, "hf_optim": args.hf_optim, "argv": sys.argv if argv is None else argv,
        "environment": environment(args, precision), "loadavg_start": loadavg(), "targets": TARGETS, "tasks": {},
    }
    for task in args.tasks:
        results["tasks"][task] = bench_task(task, args, precision, say)
    with contextlib.suppress(Exception):  # informational only
        results["robustft_optim"] = robustft_optimizer(compose_cfg([f"model={args.model}", f"data_dir={args.data_dir}"]), device)
    hf = [r.get("optim") for res in results["tasks"].values() for a, runs in res["runs"].items() if a != "robustft" for r in runs]
    results["hf_optim_resolved"] = hf[0] if hf else None
    results["loadavg_end"] = loadavg()
    results["total_s"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_s"] = usage.ru_utime + usage.ru_stime  # vs total_s: how much CPU this run actually got
    report(results, console)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float) + "\n")
        say(f"wrote {out}", style="dim")
    return results


if __name__ == "__main__":
    main()
