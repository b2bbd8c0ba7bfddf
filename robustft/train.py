"""The training loop: explicit and short. Methods change behaviour through hooks (methods/base.py)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup, set_seed

from robustft import checkpoint as ckpt
from robustft.data import collate, epoch_batches, eval_batches, load_task, tokenize
from robustft.dynamics import TrainingDynamics
from robustft.errors import UserError
from robustft.methods.base import LoopHandle, Method, TrainContext, task_loss
from robustft.metrics import main_metric, task_metrics
from robustft.models import checkpoint_dir_ok, count_params, load_model, load_tokenizer
from robustft.predict import Predictor
from robustft.progress import Progress as Bar
from robustft.robustness.base import build_evaluators, run_evaluators
from robustft.robustness.ood import dev_split
from robustft.rundir import RunDir
from robustft.stress import apply_stress

log = logging.getLogger("robustft")


class Interrupted(Exception):
    """Raised by `trainer.interrupt_at_step` to simulate preemption (the resume tests use it)."""


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


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available; use trainer.device=auto or cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` takes bf16 only where it is faster: CUDA with bf16, or a CPU with AMX tiles. On AVX512-BF16
    CPUs without AMX (like the CI machines) bf16 autocast measured slower than fp32 for minilm
    (scripts/bench_train.py prints both), so `auto` stays fp32 there; `bf16` forces it where supported.
    """
    if precision == "fp32":
        return None
    if precision not in ("auto", "bf16"):
        raise UserError(f"trainer.precision={precision} is not supported; use auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "auto":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if amx else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_max_length(tokenizer, task: DictConfig, max_length: int, model) -> None:
    """A max_length that cannot hold the special tokens plus one token per text field is a config error."""
    pair = len(task.text_fields) > 1
    needed = tokenizer.num_special_tokens_to_add(pair=pair) + len(task.text_fields)
    if max_length < needed:
        raise UserError(f"trainer.max_length={max_length} is too small for task {task.name}; use at least {needed} (e.g. 128)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise UserError(f"trainer.max_length={max_length} exceeds the model's {limit} positions; use trainer.max_length<={limit}")


@torch.no_grad()
def evaluate(model, method: Method, ds: Dataset, tokenizer, task: DictConfig, batch_size: int,
             device: torch.device, amp: torch.dtype | None) -> tuple[dict[str, float], np.ndarray]:
    """Task metrics (+ loss, examples/s) on one split; returns the predictions in dataset order."""
    model.eval()
    preds: list[np.ndarray] = []
    order: list[int] = []
    loss_sum, t0 = 0.0, time.perf_counter()

    for rows in eval_batches(ds, batch_size):
        batch = to_device(collate(ds, rows, tokenizer, task.is_regression), device)
        with autocast(device, amp):
            logits = method.predict(model, batch)
        logits = logits.float()
        loss_sum += task_loss(logits, batch["labels"], task.is_regression).item() * len(rows)
        preds.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu().numpy())
        order.extend(rows)
    elapsed = time.perf_counter() - t0
    pred = np.empty(len(ds), dtype=np.float64 if task.is_regression else np.int64)
    pred[order] = np.concatenate(preds)
    metrics = task_metrics(task.name, pred, np.asarray(ds["label"]))
    metrics["loss"] = loss_sum / len(ds)
    metrics["examples_per_s"] = len(ds) / elapsed if elapsed > 0 else float("nan")
    return metrics, pred


def fit(cfg: DictConfig, run: RunDir) -> dict[str, float]:
    """Train per `cfg`, evaluate the best checkpoint on every eval split, return flat metrics."""
    tcfg = cfg.trainer
    set_seed(int(cfg.seed))
    device = select_device(str(tcfg.device))
    amp = autocast_dtype(device, str(tcfg.precision))
    task = cfg.task

    init_from = resolve_ckpt_path(cfg.get("ckpt_path"))
    if not cfg.train and init_from is None:
        raise UserError("train=false needs a model to evaluate; set ckpt_path=<run dir or checkpoint folder>")
    tokenizer = load_tokenizer(cfg.model, init_from)
    data = load_task(task, cfg.data_dir, int(cfg.seed), need_train=bool(cfg.train))
    data = apply_stress(data, cfg, run)  # training-time stresses (train split only, recorded in run_info)
    evaluators = build_evaluators(cfg)  # fail on a misfit evaluator before any training
    model = load_model(cfg.model, task, ckpt_path=init_from)
    check_max_length(tokenizer, task, int(tcfg.max_length), model)
    method: Method = instantiate(cfg.method)
    if cfg.get("selector") and cfg.selector.get("_target_"):  # e.g. selector=rose around any method
        method = instantiate(cfg.selector, inner=method)
    ctx = TrainContext(task=task, trainer=tcfg, device=device, seed=int(cfg.seed), run_dir=run.path, tokenizer=tokenizer,
                       extra={"cfg": cfg, "run": run})  # e.g. ftft composes and runs a reference config
    model = method.setup(model, ctx).to(device)
    eval_split = str(tcfg.get("eval_split") or "validation")
    if eval_split != "validation":  # early stopping / best checkpoint on an OOD set (e.g. FTFT's OOD dev)
        data[eval_split] = dev_split(eval_split, cfg, tcfg.get("eval_max_examples"))
    evals = {s: tokenize(d, tokenizer, task, int(tcfg.max_length)) for s, d in data.items() if s != "train"}
    metric_name = main_metric(task.name)
    ckpt_dir = run.path / "checkpoints"

    run.update(
        device=str(device),
        precision="bf16" if amp is not None else "fp32",
        n_params=count_params(model),
        main_metric=f"{eval_split}/{metric_name}",
    )
    final: dict[str, float] = {}
    if cfg.train:
        train_raw = method.train_data(data["train"], ctx)
        train = tokenize(train_raw, tokenizer, task, int(tcfg.max_length))
        run.update(n_train=len(train), n_eval={s: len(d) for s, d in evals.items()})
        final.update(_train_loop(cfg, run, model, method, tokenizer, train, evals, device, amp, metric_name, ckpt_dir,
                                 eval_split))
        final.update(method.metrics(final))  # e.g. ftft: reference + main cost
        final.setdefault("cost/total_flops", final["cost/train_flops"])  # all training compute of the run
        final.setdefault("cost/total_wall_s", final["train/wall_s"])

    # Final evaluation of the best checkpoint on every held-out split.
    for split, ds in evals.items():
        metrics, _ = evaluate(model, method, ds, tokenizer, task, int(tcfg.eval_batch_size), device, amp)
        final.update({f"{split}/{k}": v for k, v in metrics.items()})
    run.write_metrics(final)
    if evaluators:
        predictor = Predictor(model, tokenizer, method, device, amp, int(tcfg.max_length), int(tcfg.eval_batch_size))
        robust = run_evaluators(evaluators, predictor, cfg, run.path)
        run.write_metrics(robust)
        final.update(robust)
    return final


def resolve_ckpt_path(path: str | None) -> str | None:
    """Accept a checkpoint folder or a run directory (-> its checkpoints/best, else checkpoints/last)."""
    if not path:
        return None
    p = Path(path)
    for candidate in (p, p / "checkpoints" / "best", p / "checkpoints" / "last"):
        if checkpoint_dir_ok(candidate):
            return str(candidate)
    raise UserError(f"ckpt_path={path} holds no checkpoint (config.json + *.safetensors); pass a run dir or checkpoint folder")


def _train_loop(cfg, run: RunDir, model, method: Method, tokenizer, train: Dataset, evals: dict[str, Dataset],
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
    bar = Bar(total=total, enabled=sys.stdout.isatty(), desc=f"{method.name} {task.name}")
    bar.update(p.step)
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
        bar.update(1)

        if p.step % int(tcfg.log_every) == 0 or p.step == total:
            row = {"step": p.step, "epoch": p.epoch, "split": "train", "loss": window_loss / window_n,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "examples_per_s": p.examples / p.train_time_s, **logs}
            run.log(row)
            if not bar.enabled:
                log.info("step %d/%d loss %.4f lr %.2e %.1f ex/s", p.step, total, row["loss"], row["lr"], row["examples_per_s"])
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
