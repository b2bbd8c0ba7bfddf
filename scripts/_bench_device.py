"""Device handling of scripts/bench_train.py: pin one GPU before CUDA starts, tell which precisions the
device cannot run, and record the hardware and the optimizer implementation beside the numbers."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from pathlib import Path
from typing import Any


def select_device(spec: str) -> str:
    """Pin the process to `spec` before CUDA initialises; returns the device every arm uses ("cpu" or "cuda").

    On CUDA exactly one GPU is left visible (the N-th of CUDA_VISIBLE_DEVICES when it is set), so that it is
    cuda:0 for robustft and for Trainer (which takes cuda:0 and data-parallelises over every visible GPU).
    CUDA reads CUDA_VISIBLE_DEVICES once, at its first query: hence no torch.cuda call before the variable
    is set, and the device count is checked after it.
    """
    import torch

    if spec == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if torch.cuda.is_initialized():
        raise SystemExit(f"bench_train.py: error: --device {spec}: CUDA was initialised before the bench could pick "
                         "the GPU; run the script in a fresh process")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = None if visible is None else [x.strip() for x in visible.split(",") if x.strip()]
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if ids is None or index < len(ids):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index) if ids is None else ids[index]
        if torch.cuda.is_available():
            if torch.cuda.device_count() != 1:  # CUDA had already read the variable: the pin did not take
                raise SystemExit(f"bench_train.py: error: --device {spec}: CUDA sees {torch.cuda.device_count()} "
                                 "GPUs after pinning one; run the script in a fresh process")
            return "cuda"
    if spec == "auto":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # as --device cpu (also for the JSON record)
        return "cpu"
    if torch.version.cuda is None and torch.version.hip is None:
        why = f"torch {torch.__version__} is built without CUDA"
    elif ids is not None and index >= len(ids):
        why = f"CUDA_VISIBLE_DEVICES={visible} leaves {len(ids)} GPU(s) visible"
    else:
        why = f"torch {torch.__version__} finds no GPU {index}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if ids else "")
    raise SystemExit(f"bench_train.py: error: --device {spec}: {why}; use --device cpu or auto, or a GPU that exists")


def unsupported(precision: str, device) -> str | None:
    """Why this device cannot run `precision` (an arm to skip, with the reason in the table), else None.

    bf16 autocast needs CUDA with bf16 or a CPU with AVX512-BF16/AMX (robustft.runtime.autocast_dtype);
    e.g. AMD EPYC CPUs without AVX512 have neither, and an arm there would raise or silently run fp32.
    """
    from robustft.errors import UserError
    from robustft.runtime import autocast_dtype

    if precision != "bf16":
        return None
    try:  # the runner's check: an error (or, before it, None) where the device has no bf16
        return None if autocast_dtype(device, "bf16") is not None else "bf16 not supported"
    except UserError:
        return f"bf16 not supported on this {'GPU' if device.type == 'cuda' else 'CPU'}"


def robustft_optimizer(cfg, device) -> str:
    """Which AdamW implementation robustft's method builds here (fused / foreach / single-tensor for-loop)."""
    import torch
    from hydra.utils import instantiate
    from torch.optim.optimizer import _default_to_fused_or_foreach

    probe = torch.nn.Linear(2, 2).to(device)
    opt = instantiate(cfg.method).configure_optimizer(probe, cfg.trainer)
    fused, foreach = opt.defaults.get("fused"), opt.defaults.get("foreach")
    if fused is None and foreach is None:
        fused, foreach = _default_to_fused_or_foreach(list(probe.parameters()), False, False)
    kind = "fused" if fused else "foreach" if foreach else "for-loop (single-tensor)"
    return f"{type(opt).__name__} {kind}"


def environment(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    import torch
    import transformers

    flags = ""
    with contextlib.suppress(OSError):
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_tile": "amx_tile" in flags,
        "cuda": torch.cuda.is_available(), "precision": precision, "requested_precision": args.precision,
        "device": args.run_device, "requested_device": args.device,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu": torch.cuda.get_device_name(0) if args.run_device == "cuda" else None,
    }

