"""The method interface. `Method` itself is ERM; robust methods override a few hooks.

The runner (robustft/runner.py) and the loop (robustft/loop.py) call, in order:
  setup(model, ctx)            -> model      wrap/modify the model (e.g. add layers)
  stages()                     -> [stage]    what must run before the main training: a RunStage (FTFT's
  stage_done(result)                         reference run; the runner runs it and hands back its StageResult)
                                             or a ModelStage (weight mixup's stage 1, run by the loop on the
                                             model after a resume restored state, before the first step)
  train_data(train, ctx)       -> Dataset    change the training data (selection, stresses)
  files() / run_info()         -> dict       records the runner writes into the run directory / run_info.json
  configure_optimizer(model)   -> optimizer
  per batch: training_step(model, batch) -> StepOutput   (the loop calls loss.backward())
  per optimizer step: optimizer_step(optimizer, model) -> logs (after clipping, before scheduler)
  predict(model, batch)        -> logits     evaluation forward
  state_dict()/load_state_dict()             anything the method must carry across a resume
  metrics(train_metrics)       -> dict       extra final metrics after training (e.g. a ModelStage's cost)
  flops_factor()               -> float      training compute per token relative to vanilla (cost/train_flops)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from datasets import Dataset
from omegaconf import DictConfig
from torch import nn

from robustft.errors import UserError
from robustft.stages import ModelStage, RunStage, StageResult


@dataclass
class TrainContext:
    """What a method may need to know about the run."""

    task: DictConfig
    trainer: DictConfig
    device: torch.device
    seed: int
    tokenizer: Any = None
    data_dir: Path | None = None  # resources relative to data_dir (adv_train's substitution lists)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)  # scalars written to metrics.jsonl train rows


@dataclass
class LoopHandle:
    """What a `ModelStage` may use of the loop."""

    log: Callable[[dict[str, Any]], None]  # append a metrics.jsonl row
    save: Callable[[], None]  # write checkpoints/last (method state, RNG, progress); a resume continues from it
    amp: torch.dtype | None = None  # the run's autocast dtype (None = fp32)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the HF model takes (labels and idx stay with the loop)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression (STS-B); computed in fp32."""
    if is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def no_decay(name: str) -> bool:
    """Biases and LayerNorm weights get no weight decay (BERT convention, as in HF Trainer)."""
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "layernorm" in name


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `weight_decay` for the weights, none where `no_decay` says so."""
    named = list(named_params)
    return [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": float(weight_decay)},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and CPU (torch >= 2.4).

    torch's CPU default is the single-tensor loop: scripts/bench_train.py measured its step about 5x slower
    than the fused kernel for minilm, which alone made a training step ~30% slower than HF Trainer's.
    """
    fused = device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


class Method:
    """Vanilla fine-tuning (empirical risk minimisation).

    A method's options are its `__init__` parameters, all set by its YAML (conf/method/<name>.yaml): none
    has a default in code, so the YAML is the one place a default lives, and none is swallowed by
    `**options`, so a misspelled option is an error (see `check_options`). Parameters listed in
    `runtime_args` are passed by the runner, never by a YAML.
    """

    runtime_args: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str) -> None:
        self.name = name
        self.ctx: TrainContext | None = None

    # --- set-up hooks -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.ctx = ctx
        return model

    def stages(self) -> list[RunStage | ModelStage]:
        """What this method needs before its main training (robustft/stages.py); the runner runs it."""
        return []

    def stage_done(self, result: StageResult) -> None:
        """The artifacts of a finished (or reused) stage: its folder and metrics."""

    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        return train

    def files(self) -> dict[str, Any]:
        """Files for the run directory, by relative name (a JSON object, or a list of rows for `.jsonl`).

        Methods never write into the run directory themselves: the runner hands these to `RunDir`.
        """
        return {}

    def run_info(self) -> dict[str, Any]:
        """Fields the runner merges into run_info.json after `train_data` (e.g. what was selected)."""
        return {}

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return adamw(decay_groups(named, trainer.weight_decay), float(trainer.lr), next(model.parameters()).device)

    # --- per-step hooks -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch)).logits

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, batch)
        return StepOutput(task_loss(logits, batch["labels"], self.ctx.task.is_regression), logits.detach())

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        optimizer.step()
        return {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch)).logits

    # --- cost and final metrics -----------------------------------------------------------------
    def flops_factor(self) -> float:
        """Training FLOPs per token in units of vanilla's forward + backward (6 x non-embedding params).

        The loop reports `cost/train_flops` = 6 N x tokens x this factor, so a method's extra passes show in
        the report's cost column. Convention (Kaplan et al. 2020): a forward costs 1/3 of a unit, a backward
        2/3 (1/3 for the activation gradients, 1/3 for the weight gradients). So R3F's second full pass
        makes 2; a backward that needs only the input's gradient (SMART's ascent step) adds 1/3; LoRA's
        backward forms no gradients for the frozen weights: 2/3. Bench ratios (scripts/bench_methods.py)
        check the counts against measured time.
        """
        return 1.0

    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """Extra metrics merged into metrics.json after training; gets the loop's train/ and cost/ metrics.

        A method whose run spends training compute outside the loop in a ModelStage (weight mixup's stage 1,
        ChildTuning-D's Fisher pass) reports `cost/total_flops` here; a RunStage's cost (FTFT's reference)
        the runner adds itself; otherwise `cost/total_flops` is `cost/train_flops`.
        """
        return {}

    # --- state carried across a resume --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --- options: the YAML's keys checked against the class, then the class built from them ----------------
HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})  # instantiate's own


def method_options(cls: type) -> tuple[set[str], set[str]]:
    """(the options `cls` takes, those without a default) from its `__init__` signature; runtime args left out."""
    skip = getattr(cls, "runtime_args", frozenset())
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]
    return {p.name for p in params}, {p.name for p in params if p.default is p.empty}


def _dataclass_option(cls: type, name: str) -> type | None:
    """The dataclass an option is annotated with (alone or in a union), e.g. ROSE's `eligible`: its keys are options too."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(name)
    except (NameError, TypeError):  # an annotation that does not resolve: nothing nested to check
        return None
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _check_keys(keys: Any, takes: set[str], required: set[str], where: str, label: str) -> None:
    """One-line UserError for the first key not in `takes` (with the closest option), or the required ones missing."""
    unknown = sorted(set(keys) - takes)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(takes), n=1)
        fix = f"did you mean '{where}.{close[0]}'?" if close else f"robustft --cfg job {label} prints every option"
        owner = label if "." not in where else f"{where} of {label}"
        raise UserError(f"unknown option '{where}.{unknown[0]}' ({owner} takes {', '.join(sorted(takes))}); {fix}")
    missing = sorted(required - set(keys))
    if missing:
        raise UserError(f"{label} needs option(s) {', '.join(f'{where}.{k}' for k in missing)}; set them in its YAML "
                        f"(conf/<group>/*.yaml holds every option's default)")


def check_options(node: Mapping[str, Any] | None, group: str) -> None:
    """Raise a one-line UserError unless a method/selector node's keys are exactly its class's options.

    It imports the `_target_` class but builds nothing (no model, no data), so the CLI's pre-flight runs
    it before any job starts. It catches `+method.foo=1`, a misspelled `+method.varaint=x`, a YAML key
    the class does not take and an option the YAML lacks; options annotated with a dataclass (ROSE's
    `eligible`) have their keys checked against its fields alike.
    """
    from hydra.utils import get_class

    if node is None:
        return
    label = f"{group}={node.get('name')}"
    target = node.get("_target_")
    if target is None:  # e.g. selector=none: nothing is built, so nothing but the name may be set
        _check_keys(node.keys(), {"name"}, {"name"}, group, label)
        return
    try:
        cls = get_class(str(target))
    except (ImportError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{group}._target_={target} cannot be imported ({reason}); fix _target_ in its YAML") from e
    takes, required = method_options(cls)
    keys = [k for k in node.keys() if k not in HYDRA_KEYS]
    _check_keys(keys, takes, required, group, label)
    for key in keys:
        sub, value = _dataclass_option(cls, key), node[key]
        if sub is not None and isinstance(value, Mapping):
            fields = dataclasses.fields(sub)
            needed = {f.name for f in fields if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING}
            _check_keys(value.keys(), {f.name for f in fields}, needed, f"{group}.{key}", label)


def instantiate_method(node: DictConfig, group: str, **runtime: Any) -> Method:
    """`hydra.utils.instantiate(node, **runtime)` with the options checked first and failures as one-line UserErrors.

    Hydra wraps whatever a constructor raises (also the UserError of a bad option value) in a multi-line
    InstantiationException; the UserError is passed on as it is, anything else becomes one.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    check_options(node, group)
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
        raise UserError(f"{group}={node.get('name')} cannot be built ({reason.splitlines()[0]}); check its options "
                        f"(robustft --cfg job {group}={node.get('name')} prints them)") from e


def build_method(cfg: DictConfig) -> Method:
    """The run's method from `cfg.method`, wrapped by `cfg.selector` when that has a class (selector=rose)."""
    method = instantiate_method(cfg.method, "method")
    selector = cfg.get("selector")
    if selector is not None and selector.get("_target_"):
        method = instantiate_method(selector, "selector", inner=method)
    elif selector is not None:
        check_options(selector, "selector")  # selector=none: only its name
    return method
