"""The training loop: explicit and short, in named parts (resume, step, log, evaluate/keep best, save).

Methods change behaviour through hooks (methods/base.py); the loop itself writes nothing: every row,
checkpoint and dynamics file goes through the run directory (robustft/rundir.py).

Data-parallel (robustft/distributed.py, robustft/parallel.py): every rank walks the same (seed, epoch)
batch order, takes its contiguous share of each global batch (`trainer.batch_size` is the global batch)
and runs the method's step inside DistributedDataParallel; the averaged gradient is the single-process
one. Losses are summed on the device and read (all-reduced) only at logging, evaluation and saving.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup

from robustft import checkpoint as ckpt
from robustft import distributed
from robustft.data import collate, epoch_batches
from robustft.dynamics import TrainingDynamics
from robustft.errors import Interrupted, Signalled, UserError, signal_unmasked
from robustft.methods.base import LoopHandle, Method
from robustft.models import check_safetensors_files, count_params
from robustft.parallel import local_rows, wrap
from robustft.predict import evaluate
from robustft.progress import Progress as Bar
from robustft.rundir import RunDir
from robustft.runtime import autocast, to_device
from robustft.stages import ModelStage

log = logging.getLogger("robustft")


def names_the_step(run: Any) -> Any:
    """A signal (robustft.cli.catch_sigterm raises `Signalled` wherever the loop is) leaves with the step it
    stopped at, for the one line "interrupted at step N (SIGTERM); rerun ... to resume"."""

    @functools.wraps(run)
    def wrapped(self: Any) -> Any:
        try:
            with signal_unmasked():  # a library may have re-raised the handler's exception as its own error
                return run(self)
        except Signalled as e:
            if e.step is None:  # an inner loop (a stage's) named it first
                e.step = self.state.step
            raise

    return wrapped


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
        self.world = distributed.world_size()
        self.ddp = None  # the DistributedDataParallel step, built in run() when world > 1
        # tokens per row, from the CPU data: a micro-batch's count needs no device sync, and every rank
        # knows the global count (equal to the padded batch's attention_mask sum)
        if "attention_mask" in train.column_names:
            self.row_tokens = [sum(m) for m in train["attention_mask"]]
        else:
            self.row_tokens = [len(x) for x in train["input_ids"]]
        # (step, micro-batch loss on the device) since the last sync; summed into state.window_loss there
        self.pending: list[tuple[int, torch.Tensor]] = []

    # --- resume and save -------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from checkpoints/last when `resume=auto` finds one (weights, optimizer, RNG, state)."""
        last = self.run_dir.last_checkpoint() if self.cfg.resume == "auto" else None
        if last is None:  # a fresh start (resume=never, or killed before the first checkpoint): a clean record
            self.run_dir.start_over()
            return
        check_safetensors_files(last)  # a damaged checkpoint is one line naming the file, not a traceback
        state = ckpt.load_training_state(last)
        self.model.load_state_dict(load_file(str(last / "model.safetensors")), strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.set_rng(state)
        self.state = LoopState(**state["progress"])
        if self.dynamics is not None:
            self.dynamics.load_state_dict(state.get("dynamics") or {})
        if self.state.log_rows is not None:
            self.run_dir.truncate_log(self.state.log_rows)  # rows logged after the checkpoint come again
        log.info("resumed from %s at step %d (epoch %d)", last, self.state.step, self.state.epoch)
        self.run_dir.update(resumed_from_step=self.state.step)

    def set_rng(self, state: dict[str, Any]) -> None:
        """Each rank's own RNG state; another number of processes continues from rank 0's, with a warning."""
        saved = int(state.get("world_size", 1))
        if saved == self.world:
            rank = distributed.rank()
            ckpt.set_rng_state(state["rng_ranks"][rank - 1] if rank else state["rng"])
            return
        # trainer.batch_size is the global batch, so the batches, the loss scale and the optimizer steps do
        # not depend on the number of processes; only the per-rank random streams (dropout) do
        log.warning("checkpoints/last was written by %d process(es), this run has %d: training continues with "
                    "the same batches, but dropout draws differ, so it will not equal an uninterrupted run",
                    saved, self.world)
        ckpt.set_rng_state(state["rng"])

    def save_last(self) -> None:
        """checkpoints/last. Every rank builds the state (its RNG is gathered to rank 0); rank 0 writes."""
        if not self.tcfg.save_checkpoints:
            return
        self.flush_loss()
        rngs = distributed.all_gather_object(ckpt.rng_state())
        self.state.log_rows = self.run_dir.log_rows
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "method": self.method.state_dict(), "rng": rngs[0], "progress": asdict(self.state),
                 "dynamics": self.dynamics.state_dict() if self.dynamics is not None else {},
                 "world_size": self.world}
        if self.world > 1:
            state["rng_ranks"] = rngs[1:]  # ranks 1, 2, ... (rank 0's is "rng", as in a single-process run)
        self.run_dir.save_checkpoint("last", self.model, self.tokenizer, state)
        distributed.barrier()  # no rank leaves (or exits, which ends the job) while rank 0 still writes

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
        """Forward/backward over the micro-batches of `group`, clip, then the method's optimizer step.

        No host sync: the loss stays on the device (`pending`), examples and tokens come from the CPU data.
        Under DDP each rank runs its share of every micro-batch, gradients are all-reduced on the last one.
        """
        s, logs, n = self.state, {}, len(group)
        for i, rows in enumerate(group):
            mine, frac = (rows, 1.0) if self.ddp is None else local_rows(rows)
            batch = to_device(collate(self.train, mine, self.tokenizer, self.task.is_regression), self.device)
            no_sync = self.ddp.no_sync() if self.ddp is not None and i < n - 1 else contextlib.nullcontext()
            with no_sync:  # forward and backward inside: DDP decides in the forward whether to reduce
                with autocast(self.device, self.amp):
                    out = self.method.training_step(self.model, batch) if self.ddp is None else self.ddp(batch)
                loss = out.loss if self.ddp is None else out.loss * (frac * self.world)
                (loss / n).backward()
            self.pending.append((s.step + 1, out.loss.detach() if self.ddp is None else out.loss.detach() * frac))
            s.window_n += 1
            s.examples += len(rows)
            s.tokens += sum(self.row_tokens[r] for r in rows)
            logs.update(out.logs)
            if self.dynamics is not None and out.logits is not None and frac > 0:
                self.dynamics.add(batch["idx"], out.logits, batch["labels"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.tcfg.max_grad_norm))
        logs.update(self.method.optimizer_step(self.optimizer, self.model))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs, grad_norm

    def flush_loss(self) -> None:
        """The one host sync of the training losses (at logging, evaluation, saving): sum them into the loss
        window, over ranks too (each rank's loss is weighted by its share of the rows); a non-finite loss
        is the one-line error naming the step it first appeared at."""
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        values = distributed.all_reduce_sum(torch.stack([v.double() for _, v in self.pending])).tolist()
        self.pending = []
        for step, loss in zip(steps, values, strict=True):
            if not math.isfinite(loss):
                raise UserError(f"the training loss is {loss} at step {step}; lower trainer.lr "
                                f"(now {float(self.tcfg.lr):g}) or check the data and the checkpoint")
            self.state.window_loss += loss

    def mean_over_ranks(self, logs: dict[str, Any]) -> dict[str, Any]:
        """The method's train-row values averaged over ranks (each rank logs its own rows' statistics)."""
        if self.world == 1 or not logs:
            return logs
        keys = sorted(logs)
        total = distributed.all_reduce_sum(torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, (total / self.world).tolist(), strict=True))

    def log_train(self, logs: dict[str, float], grad_norm: torch.Tensor, bar: Bar) -> None:
        """A metrics.jsonl train row every `log_every` steps (and at the last step); the loss is flushed."""
        s, logs = self.state, self.mean_over_ranks(logs)
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
        self.flush_loss()  # a non-finite loss stops here, before a checkpoint is kept
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
        distributed.barrier()  # rank 0 has written it
        if self.tcfg.save_checkpoints and best.is_file():
            self.model.load_state_dict(load_file(str(best)), strict=False)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # --- the loop ------------------------------------------------------------------------------
    @names_the_step
    def run(self) -> dict[str, Any]:
        self.resume()
        for stage in self.model_stages:  # e.g. weight_mixup's stage 1; resumable through save_last
            self.run_model_stage(stage)
        if self.world > 1:  # after the stages: they may change which parameters train
            self.ddp = wrap(self.model, self.method, self.device)
            if self.state.step == 0 and distributed.rank() > 0:
                # every rank starts from the run's seed: without this, ranks > 0 would draw rank 0's dropout
                # masks for their own rows at the first step (a resume restores each rank's saved state)
                torch.manual_seed(int(np.random.SeedSequence([self.seed, distributed.rank()]).generate_state(1)[0]))
        s, tcfg, stop, batches = self.state, self.tcfg, False, None
        bar = Bar(total=self.total, enabled=sys.stdout.isatty() and distributed.is_main(),
                  desc=f"{self.method.name} {self.task.name}", completed=s.step, examples=s.examples,
                  train_s=s.train_time_s)
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
            row_due = s.step % int(tcfg.log_every) == 0 or s.step == self.total
            if row_due:
                self.flush_loss()
            bar.update(1, examples=s.examples, train_s=s.train_time_s,
                       loss=s.window_loss / s.window_n if row_due else None)
            if row_due:
                self.log_train(logs, grad_norm, bar)
            stop = self.maybe_evaluate_and_save(epoch_end)
            if Signalled.pending is not None:  # the handler's exception was swallowed on its way (errors.Signalled)
                raise Signalled(Signalled.pending)
        self.flush_loss()  # steps after the last row (early stop): their losses are checked too
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
