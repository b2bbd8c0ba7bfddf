#!/usr/bin/env python
"""Per-step training time of the robust methods relative to vanilla fine-tuning, in one run.

Every arm trains its own copy of the same model (default: the real embedded ``minilm``) on the same real
SST-2 training batch (``--batch-size`` examples drawn with ``--seed``, dynamically padded like the
loop does), with the config the CLI would compose (``method=...``, ``selector=...``). A step is exactly
what ``robustft.loop`` does per optimizer step: ``method.training_step`` under the run's autocast,
``loss.backward()``, ``clip_grad_norm_``, ``method.optimizer_step``, ``scheduler.step()``,
``optimizer.zero_grad(set_to_none=True)``, and the loop's ``loss.item()``.

Each arm is warmed up (``--warmup`` steps, untimed), then the arms run ``--repeats`` rounds of
``--steps`` timed steps, interleaved (forward order, then reversed, ...) so drifting machine load hits
them alike. Printed per arm: the median step time, and the ratio to vanilla as the median over rounds
of (arm's mean step time in the round / vanilla's in the same round), which cancels load drift
between rounds, with the targets of issue 4 (Match-Tuning <= 1.05x, ROSE second-order <= 1.15x, first-order and ensemble at or
under their inherent cost of two forwards plus two backward sweeps, about 3.3x).

    python scripts/bench_methods.py                    # ~3 min on 2 free cores
    python scripts/bench_methods.py --repeats 5 --steps 5 --out bench_out/methods.json

A method's one-off `ModelStage` (child_tuning D's Fisher pass) runs once on the bench batch when its arm
is built; it is timed apart and printed after the table.

The machine may be shared: the load average is printed (and stored in the JSON) with the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

from _bench_env import REPO  # noqa: E402  (offline flags + repo on sys.path)

# arm -> (config overrides, target ratio vs vanilla or None)
ARMS: dict[str, tuple[list[str], float | None]] = {
    "vanilla": (["method=vanilla"], None),
    "match_tuning": (["method=match_tuning"], 1.05),
    "rose_first": (["method=rose", "method.variant=first"], 3.3),
    "rose_second": (["method=rose", "method.variant=second"], 1.15),
    "rose_ensemble": (["method=rose", "method.variant=ensemble"], 3.3),
    "match_tuning+rose_ensemble": (["method=match_tuning", "selector=rose", "selector.variant=ensemble"], 3.3 * 1.05),
    "lora": (["method=lora"], None),  # no bound: frozen weights skip their weight gradients and AdamW state
    "r3f": (["method=r3f"], 2.1),
    "r4f": (["method=r4f"], 2.1),
    "smart": (["method=smart"], 3.2),  # k=1
    "freelb": (["method=freelb", "method.adv_steps=3"], 3.2),  # K=3 (the YAML's SST-2 default is 2)
    "freelb_plus_plus": (["arm=freelb_plus_plus"], None),  # K=10; flops_factor 10
    "pgd": (["method=pgd"], None),  # K=2; flops_factor 7/3
    "tavat": (["method=tavat"], None),  # K=2; flops_factor 2
    "infobert": (["method=infobert"], None),  # K=3; flops_factor 4
    "adv_train": (["method=adv_train"], None),  # A2T: attacks 20% of the batch each step; flops_factor 1 + cost/*
    "ranmask": (["method=ranmask"], None),  # training: one masked forward + backward (1); prediction: 100 copies
    "safer": (["method=safer"], None),  # training: one substituted forward + backward (1); prediction: 100 copies
    "ascc": (["method=ascc"], None),  # 10 attack steps; flops_factor 2 + (1 + 2K)/3 = 9
    "dne": (["method=dne"], None),  # 3 ascent steps, each forward + backward; flops_factor K + 1 = 4
    "child_tuning_f": (["method=vanilla", "selector=child_tuning", "selector.variant=f"], 1.05),
    "child_tuning_d": (["method=vanilla", "selector=child_tuning", "selector.variant=d"], 1.05),
    "r_drop": (["method=r_drop"], 2.05),
    "mixout": (["method=mixout"], 1.3),
    "rec_adam": (["method=rec_adam"], 1.05),
}
NEEDS_TEXT = {"adv_train"}  # arms whose method reads the raw training texts (`Method.train_data`)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="robustft model config (default: the embedded minilm)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--steps", type=int, default=1, help="timed steps per arm per round")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (ratios: median over rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before timing")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default=None, help="GLUE-format data (default: $ROBUSTFT_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = os.environ.get("ROBUSTFT_DATA_DIR") or str(REPO.parent / "shared" / "data")
    if "vanilla" not in args.arms:
        args.arms = ["vanilla", *args.arms]
    return args


def compose_cfg(overrides: list[str]):
    from robustft.cli import compose_config

    return compose_config(overrides)


class Arm:
    """One method with its own model copy, optimizer and scheduler, stepping on the fixed batch."""

    def __init__(self, name: str, cfg, base_model, batch, device, amp, tokenizer=None, train=None,
                 raw=None) -> None:
        from hydra.utils import instantiate
        from transformers import get_linear_schedule_with_warmup

        from robustft.methods.base import TrainContext

        self.name, self.batch, self.device, self.amp = name, batch, device, amp
        self.max_grad_norm = float(cfg.trainer.max_grad_norm)
        method = instantiate(cfg.method)
        if cfg.get("selector") and cfg.selector.get("_target_"):
            method = instantiate(cfg.selector, inner=method)
        ctx = TrainContext(task=cfg.task, trainer=cfg.trainer, device=device, seed=int(cfg.seed), tokenizer=tokenizer,
                           data_dir=Path(cfg.data_dir))
        self.method = method
        self.model = method.setup(copy.deepcopy(base_model), ctx).to(device).train()
        if raw is not None and name in NEEDS_TEXT:  # attacks in the loop read the batch's raw texts
            method.train_data(raw, ctx)
        self.optimizer = method.configure_optimizer(self.model, cfg.trainer)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 10, 10_000)
        self.times: list[float] = []
        self.rounds: list[float] = []  # mean step time per round
        self.stage_s = self.run_model_stages(train, amp)

    def run_model_stages(self, train, amp) -> dict[str, float]:
        """One-off passes before the loop (e.g. child_tuning D's Fisher pass) on the bench batch, timed apart."""
        from robustft.methods.base import LoopHandle
        from robustft.stages import ModelStage

        handle, times = LoopHandle(log=lambda row: None, save=lambda: None, amp=amp), {}
        for stage in self.method.stages():
            if isinstance(stage, ModelStage):
                t0 = time.perf_counter()
                stage.run(self.model, train, handle)
                times[stage.name] = time.perf_counter() - t0
        return times

    def step(self) -> float:
        import torch

        from robustft.runtime import autocast

        t0 = time.perf_counter()
        with autocast(self.device, self.amp):
            out = self.method.training_step(self.model, self.batch)
        out.loss.backward()
        out.loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.method.optimizer_step(self.optimizer, self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    import transformers

    from robustft.data import collate, load_task, tokenize
    from robustft.models import load_model, load_tokenizer
    from robustft.runtime import autocast_dtype, select_device, to_device

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    common = [f"model={args.model}", f"task={args.task}", f"data_dir={Path(args.data_dir).resolve()}",
              f"trainer.batch_size={args.batch_size}", f"trainer.precision={args.precision}",
              f"trainer.max_length={args.max_length}", f"seed={args.seed}"]
    cfg0 = compose_cfg(common)
    device = select_device(str(cfg0.trainer.device))
    amp = autocast_dtype(device, args.precision)
    tokenizer = load_tokenizer(cfg0.model)
    train = load_task(cfg0.task, cfg0.data_dir, args.seed)["train"]
    rows = np.random.default_rng(args.seed).choice(len(train), args.batch_size, replace=False).tolist()
    small = tokenize(train.select(rows), tokenizer, cfg0.task, args.max_length)
    batch = to_device(collate(small, list(range(len(small))), tokenizer, cfg0.task.is_regression), device)
    base_model = load_model(cfg0.model, cfg0.task)

    arms = [Arm(name, compose_cfg(common + ARMS[name][0]), base_model, batch, device, amp, tokenizer, small,
                train.select(rows))
            for name in args.arms]
    load_before = os.getloadavg()[0]
    print(f"model={args.model} task={args.task} batch={args.batch_size}x{batch['input_ids'].shape[1]} tokens "
          f"precision={'bf16' if amp else 'fp32'} device={device} threads={torch.get_num_threads()} "
          f"load average {load_before:.2f} on {os.cpu_count()} cores", flush=True)
    for arm in arms:
        for _ in range(args.warmup):
            arm.step()
    for r in range(args.repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            times = [arm.step() for _ in range(args.steps)]
            arm.times.extend(times)
            arm.rounds.append(statistics.mean(times))
    load_after = os.getloadavg()[0]

    vanilla = arms[0]
    results = []
    print(f"\n{'arm':28s} {'median s/step':>13s} {'min':>7s} {'ratio':>7s} {'(of medians)':>12s} {'target':>7s} {'flops':>6s}")
    for arm in arms:
        med, target = statistics.median(arm.times), ARMS[arm.name][1]
        ratio = statistics.median(a / v for a, v in zip(arm.rounds, vanilla.rounds))
        ratio_of_medians = med / statistics.median(vanilla.times)
        ok = "" if target is None else ("ok" if ratio <= target else "OVER")
        tgt = "" if target is None else f"{target:.2f}x"
        flops = arm.method.flops_factor()  # the count cost/train_flops uses; the measured ratio checks it
        print(f"{arm.name:28s} {med:13.3f} {min(arm.times):7.3f} {ratio:6.2f}x {ratio_of_medians:11.2f}x "
              f"{tgt:>7s} {flops:5.2f}x {ok}")
        results.append({"arm": arm.name, "median_s": med, "min_s": min(arm.times), "ratio": ratio,
                        "ratio_of_medians": ratio_of_medians, "target": target, "flops_factor": flops, "times_s": arm.times,
                        "stages_s": arm.stage_s})
    for arm in arms:
        for stage, seconds in arm.stage_s.items():
            print(f"{arm.name}: one-off stage {stage} {seconds:.3f} s on the bench batch ({len(small)} examples)")
    print(f"\nload average {load_before:.2f} -> {load_after:.2f} (shared machine: ratios are noisy when it is high)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
                                   "load_before": load_before, "load_after": load_after, "results": results,
                                   "batch_tokens": list(batch["input_ids"].shape), "ok": all(
                                       r["target"] is None or r["ratio"] <= r["target"] for r in results
                                   ) and not any(math.isnan(r["ratio"]) for r in results)}, indent=1))


if __name__ == "__main__":
    main()
