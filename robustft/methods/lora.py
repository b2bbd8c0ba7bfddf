"""LoRA: low-rank adaptation (Hu et al., ICLR 2022; official code microsoft/LoRA), through HF `peft`.

Every targeted linear map keeps its pretrained weight W0 (d_out x d_in) frozen and learns a rank-r update:

    h = W0 x + b + (alpha / r) B A dropout(x),   A: r x d_in (Kaiming-uniform), B: d_out x r (zeros)

so training starts from the pretrained function. Only A, B and the classification head train: per
targeted module r (d_in + d_out) parameters, plus the head. The targets default per architecture to the
paper's GLUE setting (W_q and W_v), which is peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
BERT/MiniLM and RoBERTa `query`, `value`; DeBERTa-v2/v3 `query_proj`, `value_proj`. The head is every
top-level module outside the pretrained backbone (`model.base_model_prefix`), the official run_glue.py
rule (parameters whose names do not start with `roberta`/`deberta` train): BERT and RoBERTa `classifier`,
DeBERTa `pooler` and `classifier` (BERT's pretrained `bert.pooler` stays frozen, as in peft's SEQ_CLS).

Checkpoints stay plain HF models (AutoModelForSequenceClassification loads them): `MergingPeftModel.save_pretrained`
writes W0 + (alpha/r) B A merged into a copy (peft's merge_and_unload), never peft's adapter folder. Loading
such a plain state dict back (the loop's restore of checkpoints/best) puts the merged weights into the base
layers and zeroes B, so the model computes exactly the saved one. A resume must continue from the unmerged
factors: the method's state carries A, B, the head and the targeted W0 (which the merged checkpoint overwrote
on load), so checkpoints/last resumes bit for bit.

Departures from the official code (examples/NLU of microsoft/LoRA):
- A is peft's (and loralib's) Kaiming-uniform init for every family; the official DeBERTa code re-draws
  A ~ N(0, initializer_range).
- the optimizer is torch's AdamW (fused), with the runner's linear warm-up schedule; official: HF Trainer.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from peft import LoraConfig, PeftModel
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import PreTrainedModel

from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, adamw, decay_groups

ADAPTER = "default"  # peft's adapter name: the one adapter this method trains
PEFT_PREFIX = "base_model.model."  # PeftModel's state-dict keys: this + the HF model's own keys


def plain_name(name: str) -> str | None:
    """The plain HF key a PeftModel state-dict key stands for, None for LoRA's own tensors.

    peft renames a wrapped Linear's weight `<m>.weight` to `<m>.base_layer.weight` and a trained module
    `<m>` to `<m>.modules_to_save.default` (its frozen `<m>.original_module` copy has no plain role).
    """
    name = name.removeprefix(PEFT_PREFIX)
    if ".lora_" in name or ".original_module." in name:
        return None
    return name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")


class MergingPeftModel(PeftModel):
    """A PeftModel whose save_pretrained folders and plain state dicts are those of the merged HF model.

    The loop saves checkpoints through `save_pretrained` and restores them with `load_state_dict` of the
    checkpoint's file (robustft/loop.py); these two keep both plain, so a LoRA run's checkpoints are
    like every other run's. A PeftModel-keyed state dict (the loop's in-memory best weights, the method's
    resume state) loads as usual.
    """

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        """The merged plain model (merged in a copy: the adapters and the frozen weights stay as they are)."""
        merged = copy.deepcopy(self).merge_and_unload()
        merged.save_pretrained(save_directory, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if not state_dict or any(k.startswith(PEFT_PREFIX) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return self.load_plain(state_dict, strict, assign)

    @torch.no_grad()
    def load_plain(self, plain: Mapping[str, torch.Tensor], strict: bool = True,
                   assign: bool = False) -> _IncompatibleKeys:
        """Become the plain model `plain`: its weights into the base layers and head, B = 0 (no update on top).

        This overwrites the targeted frozen W0 with merged weights: a resume then loads the method's state
        (`Lora.load_state_dict`, which the loop calls after the model file) to put W0, A and B back.
        """
        keys = {plain_name(k): k for k in self.state_dict()}
        keys.pop(None, None)
        missing = sorted(k for k in keys if k not in plain)
        unexpected = sorted(k for k in plain if k not in keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"plain state dict for {type(self).__name__}: missing {missing}, unexpected {unexpected}")
        super().load_state_dict({keys[k]: v for k, v in plain.items() if k in keys}, strict=False, assign=assign)
        for name, p in self.named_parameters():
            if ".lora_B." in name:
                p.zero_()
        return _IncompatibleKeys(missing, unexpected)


def head_modules(model: PreTrainedModel) -> list[str]:
    """Top-level modules with parameters outside the pretrained backbone (the official trainable head)."""
    return [n for n, m in model.named_children()
            if n != model.base_model_prefix and any(True for _ in m.parameters())]


def _names(value: Any, option: str) -> list[str] | None:
    """A list-of-module-names option (null = the default rule)."""
    if value is None:
        return None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(v, str) and v for v in value):
        raise UserError(f"lora {option}={value!r} must be a non-empty list of module names or null; "
                        f"e.g. method.{option}=[query,value]")
    return list(value)


class Lora(Method):
    """LoRA on the encoder's attention projections, the head trained in full (see the module docstring)."""

    def __init__(self, name: str, r: int, alpha: float, dropout: float, target_modules: Any,
                 modules_to_save: Any, lr: float | None, weight_decay: float | None) -> None:
        super().__init__(name)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise UserError(f"lora r={r!r} must be a positive integer (the rank), e.g. method.r=8")
        if float(alpha) <= 0:
            raise UserError(f"lora alpha={alpha} must be > 0 (the update is scaled by alpha / r)")
        if not 0.0 <= float(dropout) < 1.0:
            raise UserError(f"lora dropout={dropout} must be in [0, 1)")
        if lr is not None and float(lr) <= 0:
            raise UserError(f"lora lr={lr} must be > 0, or null for trainer.lr")
        if weight_decay is not None and float(weight_decay) < 0:
            raise UserError(f"lora weight_decay={weight_decay} must be >= 0, or null for trainer.weight_decay")
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.target_modules = _names(target_modules, "target_modules")
        self.modules_to_save = _names(modules_to_save, "modules_to_save")
        self.lr = None if lr is None else float(lr)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.model: MergingPeftModel | None = None
        self.info: dict[str, Any] = {}
        self.resume_keys: list[str] = []  # the PeftModel keys a resume needs (see state_dict)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.ctx = ctx
        if not isinstance(model, PreTrainedModel):
            raise UserError(f"lora adapts transformer encoders; {type(model).__name__} is not one "
                            "(use a transformers model, e.g. model=minilm)")
        heads = self.modules_to_save or head_modules(model)
        self._check_modules(model, heads, "modules_to_save")
        if self.target_modules is not None:
            self._check_modules(model, self.target_modules, "target_modules")
        n_plain = sum(p.numel() for p in model.parameters())
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                            target_modules=self.target_modules, modules_to_save=heads)
        try:
            with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in v5
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                self.model = MergingPeftModel(model, config, adapter_name=ADAPTER)
        except ValueError as e:  # e.g. no default targets for this model type
            first = str(e).splitlines()[0][:160]
            raise UserError(f"lora cannot adapt model type {model.config.model_type!r} (peft: {first}); "
                            "set method.target_modules=[<names of its linear modules>]") from None
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        targets = sorted(self.model.peft_config[ADAPTER].target_modules)
        self.info = {"target_modules": targets, "modules_to_save": heads, "trainable_params": trainable,
                     "total_params": n_plain, "trainable_frac": trainable / n_plain}
        state = self.model.state_dict()
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.resume_keys = [k for k in state if k in trained or ".base_layer." in k]
        return self.model

    @staticmethod
    def _check_modules(model: nn.Module, names: list[str], option: str) -> None:
        """Every name must name a module, as peft matches it: the full name or a `.`-separated suffix."""
        keys = [k for k, _ in model.named_modules()]
        unknown = [n for n in names if not any(k == n or k.endswith(f".{n}") for k in keys)]
        if unknown:
            top = [n for n, _ in model.named_children()]
            raise UserError(f"lora {option}={unknown} match no module of {type(model).__name__} (top-level "
                            f"modules: {top}); set method.{option} to names of its modules")

    def flops_factor(self) -> float:
        # forward 1/3 + activation gradients 1/3; no weight gradients for the frozen weights (A, B and the
        # head are a fraction of a percent of the parameters)
        return 2 / 3

    def configure_optimizer(self, model: nn.Module, trainer: DictConfig) -> torch.optim.Optimizer:
        """AdamW on A, B and the head, with LoRA's own lr / weight decay when set (null = the trainer's)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        wd = trainer.weight_decay if self.weight_decay is None else self.weight_decay
        lr = float(trainer.lr) if self.lr is None else self.lr
        return adamw(decay_groups(named, wd), lr, next(model.parameters()).device)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        optimizer.step()
        return {"lora/trainable_frac": self.info["trainable_frac"]}  # a constant: in every train row

    def run_info(self) -> dict[str, Any]:
        return {"lora": dict(self.info)}

    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        return {"lora/trainable_params": float(self.info["trainable_params"]),
                "lora/trainable_frac": float(self.info["trainable_frac"])}

    # --- state carried across a resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A, B, the head and the targeted frozen W0: checkpoints/last's model file holds merged weights."""
        state = self.model.state_dict()
        return {"weights": {k: state[k] for k in self.resume_keys}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("weights") or {}
        if sorted(weights) != sorted(self.resume_keys):
            raise UserError("checkpoints/last does not hold this LoRA configuration's weights (was it written with "
                            "other lora options?); resume with the same options or start a new run directory")
        self.model.load_state_dict(weights, strict=False)  # PeftModel keys: the usual nn.Module load
