"""The runner: one run from config to metrics, in stages.

`fit` sets up (data, stresses, evaluators, model, method), runs the method's stages (robustft/stages.py),
trains (robustft/loop.py), evaluates the best checkpoint on every held-out split and runs the robustness
evaluators. Each stage runs in `lifecycle` (robustft/rundir.py), the same status handling in run_info.json as a run.
Everything the parts return is written into the run directory by `RunDir` (robustft/rundir.py).

Data-parallel (docs/multi_gpu.md): every rank runs all of `fit` (training, the final
evaluation, the evaluators, the stresses, a RunStage's run), each sharding the work; only rank 0's
`RunDir` writes. Decisions about files (reuse a cached stage, discard a stale one) are rank 0's, broadcast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig, open_dict
from transformers import set_seed

from robustft import checkpoint as ckpt
from robustft import distributed, models
from robustft.data import load_task, resolve_data_dir, tokenize
from robustft.errors import UserError
from robustft.loop import Loop
from robustft.methods.base import Method, TrainContext, build_method
from robustft.metrics import main_metric
from robustft.models import checkpoint_dir_ok, count_params, load_model, load_tokenizer, no_checkpoint_error
from robustft.ood_sets import dev_split
from robustft.predict import Predictor, evaluate, prediction_rows
from robustft.provenance import trained_selection, trained_split
from robustft.robustness.base import build_evaluators, run_evaluators
from robustft.rundir import RunDir, lifecycle
from robustft.runtime import autocast_dtype, select_device
from robustft.splits import held_out_split, selection_mode, split_records
from robustft.stages import ModelStage, RunStage, StageResult, file_lock, is_complete, stage_config, stage_key
from robustft.stress import apply_stress
from robustft.validate import validate

log = logging.getLogger("robustft")


@dataclass
class Setup:
    """What `fit` builds before any training."""

    device: torch.device
    amp: torch.dtype | None
    tokenizer: Any
    data: DatasetDict
    model: Any
    method: Method
    ctx: TrainContext
    evals: dict[str, Dataset]
    eval_split: str
    metric_name: str


def check_max_length(tokenizer, task: DictConfig, max_length: int, model) -> None:
    """A max_length that cannot hold the special tokens plus one token per text field is a config error."""
    pair = len(task.text_fields) > 1
    needed = tokenizer.num_special_tokens_to_add(pair=pair) + len(task.text_fields)
    if max_length < needed:
        raise UserError(f"trainer.max_length={max_length} is too small for task {task.name}; use at least {needed} (e.g. 128)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise UserError(f"trainer.max_length={max_length} exceeds the model's {limit} positions; use trainer.max_length<={limit}")


def load_data(cfg: DictConfig, run: RunDir, recorded: dict | None) -> DatasetDict:
    """The task's splits; a dev split carved out of train is recorded (and checked against the trained
    run's on train=false); training-time stresses (train split only) are applied and recorded."""
    task = cfg.task
    data = load_task(task, cfg.data_dir, int(cfg.seed), need_train=bool(cfg.train))
    run.update(split_seed=task.get("split_seed"), selection=selection_mode(task),
               splits=split_records(data, task, resolve_data_dir(cfg.data_dir) is not None))
    if data.carved is not None:  # the selection split came out of train: record it, check it is the trained run's
        data.carved.check(recorded, f"ckpt_path={cfg.ckpt_path}")
        run.write_dev_split(str(task.name), data.carved)
    data, stress = apply_stress(data, cfg)
    if stress is not None:
        run.update(stress=stress)
    return data


def set_up(cfg: DictConfig, run: RunDir) -> tuple[Setup, list]:
    """Device, data (+ stresses), evaluators (checked before any training), model, method, eval splits."""
    validate(cfg)  # the CLI pre-flight ran it too; here for in-process callers and each sweep job
    tcfg, task = cfg.trainer, cfg.task
    set_seed(int(cfg.seed))
    method: Method = build_method(cfg)  # first: a wrong option fails before any data or model is loaded
    run.update(threads=torch.get_num_threads())  # set by the CLI (trainer.threads); in-process callers set their own
    metric_name = main_metric(cfg.task)  # the task's main metric (checked against its metrics)
    device = data_parallel_device(select_device(str(tcfg.device)), tcfg.get("devices", "auto"))
    amp = autocast_dtype(device, str(tcfg.precision))
    init_from = resolve_ckpt_path(cfg.get("ckpt_path"))
    if not cfg.train and init_from is None:
        raise UserError("train=false needs a model to evaluate; set ckpt_path=<run dir or checkpoint folder>")
    tokenizer = load_tokenizer(cfg.model, init_from)
    data = load_data(cfg, run, reuse_trained_split(cfg, init_from))
    evaluators = build_evaluators(cfg)  # fail on a misfit evaluator before any training
    model = load_model(cfg.model, task, ckpt_path=init_from)
    check_max_length(tokenizer, task, int(tcfg.max_length), model)
    models.check_vocabulary(tokenizer, model, f"checkpoint {init_from}" if init_from else f"model={cfg.model.name}")
    ctx = TrainContext(task=task, trainer=tcfg, device=device, seed=int(cfg.seed), tokenizer=tokenizer,
                       data_dir=resolve_data_dir(cfg.data_dir))
    model = method.setup(model, ctx).to(device)
    eval_split = str(tcfg.get("eval_split") or "validation")
    if eval_split != "validation":  # early stopping / best checkpoint on an OOD set (e.g. FTFT's OOD dev)
        data[eval_split] = dev_split(eval_split, cfg, tcfg.get("eval_max_examples"))
    evals = {s: tokenize(d, tokenizer, task, int(tcfg.max_length)) for s, d in data.items() if s != "train"}
    run.update(device=str(device), world_size=distributed.world_size(), precision="bf16" if amp is not None else "fp32", n_params=count_params(model),
               main_metric=f"{eval_split}/{metric_name}", main_metric_role="selection", n_eval={k: len(d) for k, d in evals.items()},
               held_out_metric=f"{held_out_split(task)}/{metric_name}" if held_out_split(task) in evals else None)
    return Setup(device, amp, tokenizer, data, model, method, ctx, evals, eval_split, metric_name), evaluators


def data_parallel_device(device: torch.device, devices: Any) -> torch.device:
    """This rank's device: the process group decides (torchrun/SLURM); `trainer.devices=N` checks its size.

    On CUDA rank r uses cuda:<local rank> (set by distributed.init), so trainer.device must not name one GPU.
    """
    world = distributed.world_size()
    if devices != "auto" and int(devices) != world:
        raise UserError(f"trainer.devices={devices} but this run has {world} process(es); start it with "
                        f"torchrun --nproc_per_node={devices} -m robustft ... (or set trainer.devices=auto)")
    if world == 1:
        return device
    if device.type == "cuda":
        if device.index is not None and device.index != torch.cuda.current_device():
            raise UserError(f"trainer.device={device} in a data-parallel run, where rank {distributed.rank()} uses "
                            f"cuda:{torch.cuda.current_device()} (its local rank); use trainer.device=auto or cuda")
        return torch.device("cuda", torch.cuda.current_device())
    if distributed.backend() == "nccl":
        raise UserError("trainer.device=cpu but the process group uses NCCL (CUDA is available); use "
                        "trainer.device=auto, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPUs")
    return device


def fit(cfg: DictConfig, run: RunDir) -> dict[str, float]:
    """Train per `cfg`, evaluate the best checkpoint on every eval split, return flat metrics."""
    s, evaluators = set_up(cfg, run)
    final: dict[str, float] = {}
    if cfg.train:
        final.update(train(cfg, run, s))
    for split, ds in s.evals.items():  # final evaluation of the best checkpoint on every scored split
        log.info("scoring %s (%d examples)", split, len(ds))  # an evaluation-only run's first sign of life
        metrics, pred = evaluate(s.model, s.method, ds, s.tokenizer, cfg.task, int(cfg.trainer.eval_batch_size),
                                 s.device, s.amp)
        log.info("%s: %s", split, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        final.update({f"{split}/{k}": v for k, v in metrics.items()})
        run.write_record(f"predictions/{split}.jsonl", prediction_rows(ds, pred))  # per example, for paired tests
    run.write_metrics(final)
    if evaluators:
        predictor = Predictor(s.model, s.tokenizer, s.method, s.device, s.amp, int(cfg.trainer.max_length),
                              int(cfg.trainer.eval_batch_size))
        robust, samples = run_evaluators(evaluators, predictor, cfg)
        for name, records in samples.items():
            run.write_record(f"eval/{name}/samples.jsonl", records)
        run.update(evaluators={ev.name: ev.protocol() for ev in evaluators if ev.protocol()})
        run.write_metrics(robust)
        final.update(robust)
    if cfg.train and cfg.trainer.keep_checkpoints != "all":  # scored: checkpoints/ is only for later use now
        distributed.barrier()  # every rank has read checkpoints/best (the loop's restore_best)
        run.prune_checkpoints(str(cfg.trainer.keep_checkpoints))
    return final


def train(cfg: DictConfig, run: RunDir, s: Setup) -> dict[str, float]:
    """The method's stages, its training data, the loop; train/ and cost/ metrics."""
    declared = s.method.stages()
    stages = [run_stage(st, cfg, run, s.data["train"]) for st in declared if isinstance(st, RunStage)]
    for result in stages:
        s.method.stage_done(result)
    train_raw = s.method.train_data(s.data["train"], s.ctx)
    for name, obj in s.method.files().items():
        run.write_record(name, obj)
    run.update(**s.method.run_info())
    train_ds = tokenize(train_raw, s.tokenizer, cfg.task, int(cfg.trainer.max_length))
    run.update(n_train=len(train_ds))
    loop = Loop(cfg, run, s.model, s.method, s.tokenizer, train_ds, s.evals, s.device, s.amp, s.metric_name,
                s.eval_split, model_stages=[st for st in declared if isinstance(st, ModelStage)])
    final: dict[str, float] = loop.run()
    final.update(s.method.metrics(final))  # e.g. ftft: selection sizes; weight_mixup: stage-1 cost
    final.update(stage_costs(stages, final))
    final.setdefault("cost/total_flops", final["cost/train_flops"])  # all training compute of the run
    final.setdefault("cost/total_wall_s", final["train/wall_s"])
    return final


def stage_costs(stages: list[StageResult], final: dict[str, float]) -> dict[str, float]:
    """cost/<stage>_* per stage (also when reused: it is part of the method's compute), main and total."""
    if not stages:
        return {}
    out: dict[str, float] = {}
    out.update({"cost/main_flops": float(final["cost/train_flops"]), "cost/main_wall_s": float(final["train/wall_s"])})
    # on top of the method's own total (e.g. a selector's one-off pass), else the loop's
    flops = float(final.get("cost/total_flops", final["cost/train_flops"]))
    wall = float(final.get("cost/total_wall_s", final["train/wall_s"]))
    for st in stages:
        f, w = float(st.metrics.get("cost/train_flops", 0.0)), float(st.metrics.get("train/wall_s", 0.0))
        out.update({f"cost/{st.name}_flops": f, f"cost/{st.name}_tokens": float(st.metrics.get("cost/train_tokens", 0.0)),
                    f"cost/{st.name}_wall_s": w, f"{st.name}/reused": float(st.reused)})
        flops, wall = flops + f, wall + w
    out.update({"cost/total_flops": flops, "cost/total_wall_s": wall})
    return out


def run_stage(stage: RunStage, cfg: DictConfig, run: RunDir, train: Dataset) -> StageResult:
    """Run (or reuse) one stage in its own run directory; link and record it in the main run."""
    stage_cfg = stage_config(stage, cfg)
    key, source = stage_key(stage_cfg, train)
    # Data-parallel: the stage's run is data-parallel too (all ranks train it through this same code);
    # rank 0 alone holds the cache lock and decides reuse, the other ranks follow its decision.
    if stage.cache_dir:
        cache = Path(stage.cache_dir)
        path = cache / key
        lock = contextlib.nullcontext()
        if distributed.is_main():
            cache.mkdir(parents=True, exist_ok=True)
            lock = file_lock(cache / f".{key}.lock")
        with lock:
            reused = distributed.broadcast_object(is_complete(path, stage.product) and stage.reuse)
            if not reused:
                _train_stage(stage, stage_cfg, path, source)
        run.link_stage(stage.name, path)
    else:
        path = run.path / "stages" / stage.name
        reused = False
        if not distributed.broadcast_object(is_complete(path, stage.product)):
            _train_stage(stage, stage_cfg, path, source)
    distributed.barrier()  # rank 0 has written the stage's metrics.json
    if reused:
        log.info("stage %s: reusing %s (model %s, seed %s)", stage.name, path, stage_cfg.model.name, stage_cfg.seed)
    metrics = json.loads((path / "metrics.json").read_text())
    result = StageResult(stage.name, path, key if stage.cache_dir else None, reused,
                         {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}, stage_cfg)
    stages = dict(run.info.get("stages") or {})
    stages[stage.name] = {"path": str(path), "key": result.key, "reused": reused, "model": str(stage_cfg.model.name)}
    run.update(stages=stages)
    return result


def _train_stage(stage: RunStage, stage_cfg: DictConfig, path: Path, source: dict[str, Any]) -> None:
    """Train a stage run with the run lifecycle; the global RNG is restored afterwards, so the main run is the
    same whether the stage was trained here or reused."""
    complete = is_complete(path, stage.product)
    resumable = (path / "checkpoints" / "last").is_dir() and not complete
    if distributed.broadcast_object(path.exists() and not resumable):
        log.info("stage %s: discarding %s (%s)", stage.name, path, "reuse=false" if complete else "incomplete")
        if distributed.is_main():
            shutil.rmtree(path)
        distributed.barrier()
    log.info("stage %s: training %s into %s", stage.name, stage_cfg.model.name, path)
    stage_run = RunDir(path)
    stage_run.write_record("stage.json", source)
    stage_run.write_record("stage_config.yaml", stage_cfg)
    state = ckpt.rng_state()
    try:
        with lifecycle(stage_run, stage_cfg, method_name=stage.name):
            fit(stage_cfg, stage_run)
    finally:
        ckpt.set_rng_state(state)


def reuse_trained_split(cfg: DictConfig, init_from: str | None) -> dict | None:
    """train=false: carve the selection split the evaluated model was trained beside (its run's selection
    mode and split seed).

    Sets cfg.task.selection and cfg.task.split_seed, which evaluators reloading the data (attacks) also read;
    returns the run's dev_split record (count + sha256 of the carved ids) for the check after the carve, or None.
    """
    if cfg.train or init_from is None:
        return None
    split_seed, recorded = trained_split(init_from, str(cfg.task.name))
    mode = "carve" if recorded is not None else trained_selection(init_from, str(cfg.task.name))
    if mode is not None and mode != selection_mode(cfg.task):
        log.info("task.selection=%s -> %s, the selection of the run that trained %s", selection_mode(cfg.task), mode,
                 init_from)
        with open_dict(cfg.task):
            cfg.task.selection = mode
    if split_seed is not None and split_seed != cfg.task.get("split_seed"):
        log.info("task.split_seed=%s -> %s, the split seed of the run that trained %s", cfg.task.get("split_seed"),
                 split_seed, init_from)
        with open_dict(cfg.task):
            cfg.task.split_seed = split_seed
    return recorded


def resolve_ckpt_path(path: str | None) -> str | None:
    """Accept a checkpoint folder or a run directory (-> its checkpoints/best, else checkpoints/last)."""
    if not path:
        return None
    p = Path(path)
    for candidate in (p, p / "checkpoints" / "best", p / "checkpoints" / "last"):
        if checkpoint_dir_ok(candidate):
            return str(candidate)
    raise no_checkpoint_error(path)
