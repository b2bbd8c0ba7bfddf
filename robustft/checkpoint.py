"""Checkpoints: `save_pretrained` folders (safetensors) plus the training state, written atomically.

Training state (optimizer, scheduler, RNG, method state, progress) is stored without pickle: tensors in
`training_state.safetensors`, everything else in `training_state.json`, with `{"__tensor__": key}`
placeholders linking the two.

Every file robustft writes into a checkpoint folder is listed with its sha256 in `checksums.sha256`
(`sha256sum` format: `sha256sum -c checksums.sha256` checks it by hand), and `verify_checksums` checks
it before a robustft checkpoint is loaded (resume, `ckpt_path`). A folder without the list (another tool's
checkpoint) loads as before.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
CHECKSUMS = "checksums.sha256"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested dict/list by a placeholder and collect it in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        # JSON keys are strings: remember int keys (optimizer state is keyed by param index)
        return {"__dict__": [[k, flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, tensors, prefix) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's CPU generator state and, on CUDA, that of `device`: enough to draw the same dropout masks again.

    Cheaper than `rng_state` (no numpy/python/all-device states) for a redraw inside one step.
    """
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_torch_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; a crash leaves either the old or the new one."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(path: Path, model, tokenizer, state: dict[str, Any] | None) -> None:
    """Write a loadable `save_pretrained` folder (+ training state when given) atomically.

    A failed write (a full disk) removes the half-written `.tmp-` folder and leaves the previous checkpoint as it
    was; the error is an OSError naming the file, which the CLI turns into its one line.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if state is not None:
            tensors: dict[str, torch.Tensor] = {}
            skeleton = flatten(state, tensors)
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(skeleton))
        write_checksums(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and "os error 28" in str(e):  # safetensors' own error for ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
        raise
    _replace_dir(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """checksums.sha256: every file of the folder just written (read back from the page cache: cheap)."""
    lines = [f"{sha256_file(f)}  {f.name}\n" for f in sorted(folder.iterdir()) if f.is_file() and f.name != CHECKSUMS]
    (folder / CHECKSUMS).write_text("".join(lines))


def verify_checksums(folder: Path) -> None:
    """Raise a UserError naming the first file whose sha256 differs from what robustft recorded (a flipped
    byte, a partial copy); no record (another tool's checkpoint) passes."""
    from robustft.errors import UserError

    record = Path(folder) / CHECKSUMS
    if not record.is_file():
        return
    for line in record.read_text().splitlines():
        digest, _, name = line.partition("  ")
        file = Path(folder) / name
        if not file.is_file():
            raise UserError(f"checkpoint file {file} is missing (listed in {record}); re-copy the checkpoint or "
                            "pass another ckpt_path")
        if sha256_file(file) != digest:
            raise UserError(f"checkpoint file {file} differs from what robustft saved (sha256 mismatch with {record}); "
                            "re-copy the checkpoint, pass another ckpt_path, or rerun with resume=never")


def find_checkpoint(path: Path) -> Path | None:
    """The folder to resume from: `path`, or its `.old-` twin if a crash hit mid-swap."""
    path = Path(path)
    for candidate in (path, path.with_name(f".old-{path.name}")):
        if (candidate / STATE_JSON).is_file():
            return candidate
    return None


def load_training_state(path: Path) -> dict[str, Any]:
    tensors = load_file(str(Path(path) / STATE_TENSORS))
    return unflatten(json.loads((Path(path) / STATE_JSON).read_text()), tensors)
