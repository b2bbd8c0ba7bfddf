"""The training loop: explicit and short, in named parts (resume, step, log, evaluate/keep best, save).

Methods change behaviour through hooks (methods/base.py); the loop itself writes nothing: every row,
checkpoint and dynamics file goes through the run directory (robustft/rundir.py).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from datasets import Dataset
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup

from robustft import checkpoint as ckpt
from robustft.data import collate, epoch_batches
from robustft.dynamics import TrainingDynamics
from robustft.errors import Interrupted, UserError
from robustft.methods.base import LoopHandle, Method
from robustft.models import check_safetensors_files, count_params
from robustft.predict import evaluate
from robustft.progress import Progress as Bar
from robustft.rundir import RunDir
from robustft.runtime import autocast, to_device
from robustft.stages import ModelStage

log = logging.getLogger("robustft")


@dataclass
class LoopState:
    """Where training is; saved with every checkpoint so a resumed run continues exactly.

    The loss window and the number of metrics.jsonl rows travel too: a resumed run drops the rows written
    after its checkpoint and logs the same loss values as an uninterrupted run.
    """

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
    window_loss: float = 0.0  # sum of micro-batch losses since the last train row
    window_n: int = 0
    log_rows: int | None = None  # metrics.jsonl rows at the time of the checkpoint


class Loop:
    """One training run of `method` on `model`; `run()` returns the train/ and cost/ metrics."""

    def __init__(self, cfg: DictConfig, run: RunDir, model, method: Method, tokenizer, train: Dataset,
                 evals: dict[str, Dataset], device: torch.device, amp: torch.dtype | None, metric_name: str,
                 eval_split: str = "validation", model_stages: list[ModelStage] | None = None) -> None:
        self.cfg, self.tcfg, self.task, self.seed = cfg, cfg.trainer, cfg.task, int(cfg.seed)
        self.run_dir, self.model, self.method, self.tokenizer = run, model, method, tokenizer
        self.train, self.evals, self.device, self.amp = train, evals, device, amp
        self.metric_name, self.eval_split = metric_name, eval_split
        self.batch_size, self.accum = int(self.tcfg.batch_size), int(self.tcfg.grad_accum)
        self.steps_per_epoch = math.ceil(math.ceil(len(train) / self.batch_size) / self.accum)
        max_steps = int(self.tcfg.max_steps)
        self.total = max_steps if max_steps > 0 else int(self.tcfg.epochs) * self.steps_per_epoch
        self.by_epoch = str(self.tcfg.eval_every) == "epoch"
        self.eval_every = self.steps_per_epoch if self.by_epoch else int(self.tcfg.eval_every)
        self.optimizer = method.configure_optimizer(model, self.tcfg)
        warmup = math.ceil(float(self.tcfg.warmup_ratio) * self.total)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total)
        self.flops_per_token = 6 * count_params(model, non_embedding=True)  # forward + backward, Kaplan et al.
        self.state = LoopState()
        self.best_state: dict[str, torch.Tensor] | None = None  # best weights when checkpoints are off
        self.dynamics = TrainingDynamics() if self.tcfg.get("record_dynamics") else None
        self.model_stages = list(model_stages or [])

    # --- resume and save -------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from checkpoints/last when `resume=auto` finds one (weights, optimizer, RNG, state)."""
        last = self.run_dir.last_checkpoint() if self.cfg.resume == "auto" else None
        if last is None:
            return
        check_safetensors_files(last)  # a damaged checkpoint is one line naming the file, not a traceback
        state = ckpt.load_training_state(last)
        self.model.load_state_dict(load_file(str(last / "model.safetensors")), strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        ckpt.set_rng_state(state["rng"])
        self.state = LoopState(**state["progress"])
        if self.dynamics is not None:
            self.dynamics.load_state_dict(state.get("dynamics") or {})
        if self.state.log_rows is not None:
            self.run_dir.truncate_log(self.state.log_rows)  # rows logged after the checkpoint come again
        log.info("resumed from %s at step %d (epoch %d)", last, self.state.step, self.state.epoch)
        self.run_dir.update(resumed_from_step=self.state.step)

    def save_last(self) -> None:
        if not self.tcfg.save_checkpoints:
            return
        self.state.log_rows = self.run_dir.log_rows
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "method": self.method.state_dict(), "rng": ckpt.rng_state(), "progress": asdict(self.state),
                 "dynamics": self.dynamics.state_dict() if self.dynamics is not None else {}}
        self.run_dir.save_checkpoint("last", self.model, self.tokenizer, state)

    def run_model_stage(self, stage: ModelStage) -> None:
        """Run a stage on the model before the first step, its status recorded in run_info.json stages."""
        handle = LoopHandle(log=self.run_dir.log, save=self.save_last, amp=self.amp)
        self.run_dir.stage_status(stage.name, "running")
        try:
            stage.run(self.model, self.train, handle)
        except Interrupted:
            self.run_dir.stage_status(stage.name, "interrupted")
            raise
        except BaseException:
            self.run_dir.stage_status(stage.name, "failed")
            raise
        self.run_dir.stage_status(stage.name, "completed")

    # --- one optimizer step ----------------------------------------------------------------------
    def step(self, group: list[list[int]]) -> tuple[dict[str, float], torch.Tensor]:
        """Forward/backward over the micro-batches of `group`, clip, then the method's optimizer step."""
        s, logs = self.state, {}
        for rows in group:
            batch = to_device(collate(self.train, rows, self.tokenizer, self.task.is_regression), self.device)
            with autocast(self.device, self.amp):
                out = self.method.training_step(self.model, batch)
            (out.loss / len(group)).backward()
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise UserError(f"the training loss is {loss} at step {s.step + 1}; lower trainer.lr "
                                f"(now {float(self.tcfg.lr):g}) or check the data and the checkpoint")
            s.window_loss += loss
            s.window_n += 1
            s.examples += len(rows)
            s.tokens += int(batch["attention_mask"].sum())
            logs.update(out.logs)
            if self.dynamics is not None and out.logits is not None:
                self.dynamics.add(batch["idx"], out.logits, batch["labels"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.tcfg.max_grad_norm))
        logs.update(self.method.optimizer_step(self.optimizer, self.model))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs, grad_norm

    def log_train(self, logs: dict[str, float], grad_norm: torch.Tensor, bar: Bar) -> None:
        """A metrics.jsonl train row every `log_every` steps (and at the last step)."""
        s = self.state
        row = {"step": s.step, "epoch": s.epoch, "split": "train", "loss": s.window_loss / s.window_n,
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               "examples_per_s": s.examples / s.train_time_s, **logs}
        self.run_dir.log(row)
        if not bar.enabled:
            log.info("step %d/%d loss %.4f lr %.2e %.1f ex/s", s.step, self.total, row["loss"], row["lr"],
                     bar.window_rate())  # the current rate, not the run's average
        s.window_loss, s.window_n = 0.0, 0

    # --- evaluation and the best checkpoint --------------------------------------------------------
    def evaluate_and_keep_best(self) -> bool:
        """Evaluate, keep the best checkpoint; returns True when early stopping says stop."""
        s, tcfg = self.state, self.tcfg
        self.model.eval()
        metrics, _ = evaluate(self.model, self.method, self.evals[self.eval_split], self.tokenizer, self.task,
                              int(tcfg.eval_batch_size), self.device, self.amp)
        self.model.train()
        self.run_dir.log({"step": s.step, "epoch": s.epoch, "split": self.eval_split, **metrics})
        log.info("step %d eval: %s", s.step, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        value = metrics[self.metric_name]
        if s.best_metric is None or value > s.best_metric:
            s.best_metric, s.best_step, s.bad_evals = value, s.step, 0
            if tcfg.save_checkpoints:
                self.run_dir.save_checkpoint("best", self.model, self.tokenizer, None)
            else:
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            s.bad_evals += 1
        patience = int(tcfg.early_stopping_patience)
        return patience > 0 and s.bad_evals >= patience

    def restore_best(self) -> None:
        """Put the best weights back for the final evaluation."""
        best = self.run_dir.path / "checkpoints" / "best" / "model.safetensors"
        if self.tcfg.save_checkpoints and best.is_file():
            self.model.load_state_dict(load_file(str(best)), strict=False)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.resume()
        for stage in self.model_stages:  # e.g. weight_mixup's stage 1; resumable through save_last
            self.run_model_stage(stage)
        s, tcfg, stop, batches = self.state, self.tcfg, False, None
        bar = Bar(total=self.total, enabled=sys.stdout.isatty(), desc=f"{self.method.name} {self.task.name}",
                  completed=s.step, examples=s.examples, train_s=s.train_time_s)
        self.model.train()
        while s.step < self.total and not stop:
            if batches is None:  # the epoch's order is a pure function of (seed, epoch)
                batches = epoch_batches(self.train, self.batch_size, self.seed, s.epoch, bool(tcfg.group_by_length))
            t0 = time.perf_counter()
            group = batches[s.batch_in_epoch : s.batch_in_epoch + self.accum]
            logs, grad_norm = self.step(group)
            s.train_time_s += time.perf_counter() - t0
            s.step += 1
            s.batch_in_epoch += len(group)
            epoch_end = s.batch_in_epoch >= len(batches)
            if epoch_end and self.dynamics is not None:
                self.run_dir.write_dynamics(s.epoch, self.dynamics.epoch_rows(s.epoch))
            if epoch_end:
                s.epoch, s.batch_in_epoch, batches = s.epoch + 1, 0, None
            bar.update(1, examples=s.examples, train_s=s.train_time_s, loss=s.window_loss / s.window_n)
            if s.step % int(tcfg.log_every) == 0 or s.step == self.total:
                self.log_train(logs, grad_norm, bar)
            stop = self.maybe_evaluate_and_save(epoch_end)
        bar.close()
        self.restore_best()
        return self.results()

    def maybe_evaluate_and_save(self, epoch_end: bool) -> bool:
        """Evaluate (and save) on schedule, else save every `save_every` steps; True = stop early."""
        s, tcfg, stop = self.state, self.tcfg, False
        due = epoch_end if self.by_epoch else s.step % self.eval_every == 0
        if due or s.step == self.total:
            stop = self.evaluate_and_keep_best()
            s.stopped_early = stop
            self.save_last()
            if stop:
                log.info("early stopping at step %d (best step %d)", s.step, s.best_step)
        elif s.step % int(tcfg.save_every) == 0:
            self.save_last()
        if tcfg.get("interrupt_at_step") and s.step == int(tcfg.interrupt_at_step):
            self.save_last()
            raise Interrupted(f"interrupted at step {s.step} (trainer.interrupt_at_step)")
        return stop

    def results(self) -> dict[str, Any]:
        s = self.state
        out: dict[str, Any] = {
            "train/steps": s.step,
            "train/epochs": s.step / self.steps_per_epoch,
            "train/examples": s.examples,
            "train/wall_s": s.train_time_s,
            "train/examples_per_s": s.examples / s.train_time_s if s.train_time_s else float("nan"),
            "train/stopped_early": float(s.stopped_early),
            "best/step": s.best_step,
            f"best/{self.eval_split}_{self.metric_name}": s.best_metric,
            "cost/train_tokens": s.tokens,
            "cost/train_flops": float(self.flops_per_token * s.tokens * self.method.flops_factor()),
        }
        self.run_dir.update(train_time_s=s.train_time_s, train_examples_per_s=out["train/examples_per_s"],
                            steps=s.step, flops_factor=self.method.flops_factor())
        return out
