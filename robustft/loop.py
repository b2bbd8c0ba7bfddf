"""The training loop: explicit and short. Methods change behaviour through hooks (methods/base.py)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup

from robustft import checkpoint as ckpt
from robustft.data import collate, epoch_batches
from robustft.dynamics import TrainingDynamics
from robustft.errors import Interrupted
from robustft.methods.base import LoopHandle, Method
from robustft.models import count_params
from robustft.predict import evaluate
from robustft.progress import Progress as Bar
from robustft.rundir import RunDir
from robustft.runtime import autocast, to_device

log = logging.getLogger("robustft")


@dataclass
class Progress:
    """Where training is; saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int = -1
    bad_evals: int = 0
    examples: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    stopped_early: bool = False


def train_loop(cfg, run: RunDir, model, method: Method, tokenizer, train: Dataset, evals: dict[str, Dataset],
                device, amp, metric_name: str, ckpt_dir: Path, eval_split: str = "validation") -> dict[str, float]:
    tcfg, task, seed = cfg.trainer, cfg.task, int(cfg.seed)
    batch_size, accum = int(tcfg.batch_size), int(tcfg.grad_accum)
    n_batches = math.ceil(len(train) / batch_size)
    steps_per_epoch = math.ceil(n_batches / accum)
    total = int(tcfg.max_steps) if int(tcfg.max_steps) > 0 else int(tcfg.epochs) * steps_per_epoch
    eval_every = steps_per_epoch if str(tcfg.eval_every) == "epoch" else int(tcfg.eval_every)
    optimizer = method.configure_optimizer(model, tcfg)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(float(tcfg.warmup_ratio) * total), total)
    flops_per_token = 6 * count_params(model, non_embedding=True)  # forward + backward, Kaplan et al.
    p = Progress()
    best_state: dict[str, torch.Tensor] | None = None

    dynamics = TrainingDynamics(run.path / "training_dynamics") if tcfg.get("record_dynamics") else None
    last = ckpt.find_checkpoint(ckpt_dir / "last") if cfg.resume == "auto" else None
    if last is not None:
        state = ckpt.load_training_state(last)
        model.load_state_dict(load_file(str(last / "model.safetensors")), strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        ckpt.set_rng_state(state["rng"])
        p = Progress(**state["progress"])
        if dynamics is not None:
            dynamics.load_state_dict(state.get("dynamics") or {})
        log.info("resumed from %s at step %d (epoch %d)", last, p.step, p.epoch)
        run.update(resumed_from_step=p.step)

    def save_last() -> None:
        if tcfg.save_checkpoints:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "method": method.state_dict(), "rng": ckpt.rng_state(), "progress": asdict(p),
                     "dynamics": dynamics.state_dict() if dynamics is not None else {}}
            ckpt.save_checkpoint(ckpt_dir / "last", model, tokenizer, state)

    def run_eval() -> bool:
        """Evaluate, keep the best checkpoint; returns True when early stopping says stop."""
        nonlocal best_state
        metrics, _ = evaluate(model, method, evals[eval_split], tokenizer, task, int(tcfg.eval_batch_size), device, amp)
        run.log({"step": p.step, "epoch": p.epoch, "split": eval_split, **metrics})
        value = metrics[metric_name]
        log.info("step %d eval: %s", p.step, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if p.best_metric is None or value > p.best_metric:
            p.best_metric, p.best_step, p.bad_evals = value, p.step, 0
            if tcfg.save_checkpoints:
                ckpt.save_checkpoint(ckpt_dir / "best", model, tokenizer, None)
            else:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            p.bad_evals += 1
        patience = int(tcfg.early_stopping_patience)
        return patience > 0 and p.bad_evals >= patience

    # A method's own stage before the first step (weight_mixup's stage 1), resumable through save_last.
    method.before_training(model, train, LoopHandle(log=run.log, save=save_last, amp=amp))
    bar = Bar(total=total, enabled=sys.stdout.isatty(), desc=f"{method.name} {task.name}", completed=p.step,
              examples=p.examples, train_s=p.train_time_s)
    window_loss, window_n, stop, batches = 0.0, 0, False, None
    model.train()
    while p.step < total and not stop:
        if batches is None:  # the epoch's order is a pure function of (seed, epoch)
            batches = epoch_batches(train, batch_size, seed, p.epoch, bool(tcfg.group_by_length))
        t0 = time.perf_counter()
        group = batches[p.batch_in_epoch : p.batch_in_epoch + accum]
        logs: dict[str, float] = {}
        for rows in group:
            batch = to_device(collate(train, rows, tokenizer, task.is_regression), device)
            with autocast(device, amp):
                out = method.training_step(model, batch)
            (out.loss / len(group)).backward()
            window_loss += out.loss.item()
            window_n += 1
            p.examples += len(rows)
            p.tokens += int(batch["attention_mask"].sum())
            logs.update(out.logs)
            if dynamics is not None and out.logits is not None:
                dynamics.add(batch["idx"], out.logits, batch["labels"])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.max_grad_norm))
        logs.update(method.optimizer_step(optimizer, model))
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        p.train_time_s += time.perf_counter() - t0
        p.step += 1
        p.batch_in_epoch += len(group)
        epoch_end = p.batch_in_epoch >= len(batches)
        if epoch_end and dynamics is not None:
            dynamics.write_epoch(p.epoch)
        if epoch_end:
            p.epoch, p.batch_in_epoch, batches = p.epoch + 1, 0, None
        bar.update(1, examples=p.examples, train_s=p.train_time_s, loss=window_loss / window_n)

        if p.step % int(tcfg.log_every) == 0 or p.step == total:
            row = {"step": p.step, "epoch": p.epoch, "split": "train", "loss": window_loss / window_n,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "examples_per_s": p.examples / p.train_time_s, **logs}
            run.log(row)
            if not bar.enabled:
                log.info("step %d/%d loss %.4f lr %.2e %.1f ex/s", p.step, total, row["loss"], row["lr"], bar.window_rate())
            window_loss, window_n = 0.0, 0
        by_epoch = str(tcfg.eval_every) == "epoch"
        if (by_epoch and epoch_end) or (not by_epoch and p.step % eval_every == 0) or p.step == total:
            model.eval()
            stop = run_eval()
            model.train()
            p.stopped_early = stop
            save_last()
            if stop:
                log.info("early stopping at step %d (best step %d)", p.step, p.best_step)
        elif p.step % int(tcfg.save_every) == 0:
            save_last()
        if tcfg.get("interrupt_at_step") and p.step == int(tcfg.interrupt_at_step):
            save_last()
            raise Interrupted(f"interrupted at step {p.step} (trainer.interrupt_at_step)")
    bar.close()

    # Restore the best weights for the final evaluation.
    if tcfg.save_checkpoints and (ckpt_dir / "best").is_dir():
        model.load_state_dict(load_file(str(ckpt_dir / "best" / "model.safetensors")), strict=False)
    elif best_state is not None:
        model.load_state_dict(best_state)
    out: dict[str, Any] = {
        "train/steps": p.step,
        "train/epochs": p.step / steps_per_epoch,
        "train/examples": p.examples,
        "train/wall_s": p.train_time_s,
        "train/examples_per_s": p.examples / p.train_time_s if p.train_time_s else float("nan"),
        "train/stopped_early": float(p.stopped_early),
        "best/step": p.best_step,
        f"best/{eval_split}_{metric_name}": p.best_metric,
        "cost/train_tokens": p.tokens,
        "cost/train_flops": float(flops_per_token * p.tokens),
    }
    run.update(train_time_s=p.train_time_s, train_examples_per_s=out["train/examples_per_s"], steps=p.step)
    return out
