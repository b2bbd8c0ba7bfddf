"""The Hugging Face `Trainer` arms of scripts/bench_train.py (see its docstring for what they run and time)."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any


def run_trainer(b: Any, arm: str, steps: int) -> dict[str, Any]:
    """One timed run of a Trainer arm (`hf_dynamic` or `hf_maxlen`) on the `Bench` `b`'s data and settings."""
    from transformers import (
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from robustft.models import load_model

    class Timer(TrainerCallback):
        t0 = t1 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

    class Counting:
        """Wraps the collator to count examples and (padded / real) tokens actually trained on."""

        def __init__(self, inner):
            self.inner, self.examples, self.padded, self.real = inner, 0, 0, 0

        def __call__(self, features):
            batch = self.inner(features)
            self.examples += len(features)
            self.padded += batch["input_ids"].numel()
            self.real += int(batch["attention_mask"].sum())
            return batch

    dynamic = arm == "hf_dynamic"
    collator = Counting(DataCollatorWithPadding(b.tokenizer) if dynamic else default_data_collator)
    set_seed(b.seed)  # same classifier-head init as fit()
    model = load_model(b.cfg.model, b.cfg.task)
    timer = Timer()
    extra = {} if b.args.hf_optim == "default" else {"optim": b.args.hf_optim}
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=b.bs, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=b.lr, weight_decay=b.weight_decay,
            warmup_steps=math.ceil(b.warmup_ratio * steps),  # = robustft's schedule exactly
            lr_scheduler_type="linear", max_grad_norm=b.max_grad_norm, seed=b.seed,
            bf16=b.precision == "bf16", use_cpu=b.args.run_device == "cpu",
            eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy="group_by_length" if dynamic else "random",
            **extra)
        trainer = Trainer(model=model, args=targs, train_dataset=b.train_dyn if dynamic else b.train_max,
                          data_collator=collator, processing_class=b.tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict (after timing; just noise)
        out = trainer.train()
    elapsed = timer.t1 - timer.t0
    return {"examples_per_s": collator.examples / elapsed, "examples": collator.examples,
            "steps": int(out.global_step), "time_s": elapsed, "real_tokens": collator.real,
            "padded_tokens": collator.padded,
            "hf_train_samples_per_second": float(out.metrics.get("train_samples_per_second", float("nan"))),
            "hf_train_runtime": float(out.metrics.get("train_runtime", float("nan"))),
            "optim": getattr(targs.optim, "value", str(targs.optim))}
