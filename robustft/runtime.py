"""Runtime helpers shared by the loop, evaluation and methods: device, autocast, moving batches.

They sit at the bottom of the layers (nothing here imports other robustft modules but `errors`), so
evaluation and methods use them without reaching up into the training loop.
"""

from __future__ import annotations

import contextlib

import torch

from robustft.errors import UserError


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available; use trainer.device=auto or cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # robustft.validate rejects these at start-up; this guards direct callers
        raise UserError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"trainer.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                        "use trainer.device=cuda (the first) or cuda:N with N below that")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` takes bf16 only where it is faster: CUDA with bf16, or a CPU with AMX tiles. On AVX512-BF16
    CPUs without AMX (like the CI machines) bf16 autocast measured slower than fp32 for minilm
    (scripts/bench_train.py prints both), so `auto` stays fp32 there; `bf16` forces it where supported and is an error elsewhere.
    """
    if precision == "fp32":
        return None
    if precision not in ("auto", "bf16"):
        raise UserError(f"trainer.precision={precision} is not supported; use auto, bf16 or fp32")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif precision == "auto":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if amx else None
    else:
        supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if supported:
        return torch.bfloat16
    if precision == "bf16":  # asked for explicitly: running fp32 instead would be silently different
        raise UserError(f"trainer.precision=bf16 but this {device.type.upper()} has no bf16 support; "
                        "use trainer.precision=auto (bf16 only where supported) or fp32")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A CPU batch on `device`. On CUDA through pinned memory, so the copy runs asynchronously (a plain
    non_blocking copy from pageable memory waits for the host); on the CPU the tensors stay as they are."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
