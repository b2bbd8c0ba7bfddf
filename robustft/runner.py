"""The runner: one run from config to metrics (data, model, method, the loop, final evaluation, evaluators)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig
from transformers import set_seed

from robustft.data import load_task, tokenize
from robustft.errors import UserError
from robustft.loop import train_loop
from robustft.methods.base import Method, TrainContext, build_method
from robustft.metrics import main_metric
from robustft.models import checkpoint_dir_ok, count_params, load_model, load_tokenizer
from robustft.predict import Predictor, evaluate
from robustft.robustness.base import build_evaluators, run_evaluators
from robustft.robustness.ood import dev_split
from robustft.rundir import RunDir
from robustft.runtime import autocast_dtype, select_device
from robustft.stress import apply_stress

log = logging.getLogger("robustft")


def check_max_length(tokenizer, task: DictConfig, max_length: int, model) -> None:
    """A max_length that cannot hold the special tokens plus one token per text field is a config error."""
    pair = len(task.text_fields) > 1
    needed = tokenizer.num_special_tokens_to_add(pair=pair) + len(task.text_fields)
    if max_length < needed:
        raise UserError(f"trainer.max_length={max_length} is too small for task {task.name}; use at least {needed} (e.g. 128)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise UserError(f"trainer.max_length={max_length} exceeds the model's {limit} positions; use trainer.max_length<={limit}")


def fit(cfg: DictConfig, run: RunDir) -> dict[str, float]:
    """Train per `cfg`, evaluate the best checkpoint on every eval split, return flat metrics."""
    tcfg = cfg.trainer
    set_seed(int(cfg.seed))
    method: Method = build_method(cfg)  # first: a wrong option fails before any data or model is loaded
    metric_name = main_metric(cfg.task)  # the task's main metric (checked against its metrics)
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
    ctx = TrainContext(task=task, trainer=tcfg, device=device, seed=int(cfg.seed), run_dir=run.path, tokenizer=tokenizer,
                       extra={"cfg": cfg, "run": run})  # e.g. ftft composes and runs a reference config
    model = method.setup(model, ctx).to(device)
    eval_split = str(tcfg.get("eval_split") or "validation")
    if eval_split != "validation":  # early stopping / best checkpoint on an OOD set (e.g. FTFT's OOD dev)
        data[eval_split] = dev_split(eval_split, cfg, tcfg.get("eval_max_examples"))
    evals = {s: tokenize(d, tokenizer, task, int(tcfg.max_length)) for s, d in data.items() if s != "train"}
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
        final.update(train_loop(cfg, run, model, method, tokenizer, train, evals, device, amp, metric_name, ckpt_dir,
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
