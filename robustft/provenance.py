"""Provenance recorded in run_info.json: the code (git sha, package versions), the SLURM job, and what the
run that trained a checkpoint recorded about its splits. Reads only; `RunDir` writes the records."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ["robustft", "torch", "transformers", "datasets", "evaluate", "hydra-core", "safetensors", "numpy"]


def git_sha() -> str | None:
    """The commit of the robustft source tree, with '-dirty' when it has uncommitted changes."""
    src = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def slurm_job_id() -> str | None:
    """The id `squeue`, `sacct` and the `.submitit/` folders use: `<array job id>_<task>` for an array task."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def trained_split(ckpt_path: str | Path, task: str) -> tuple[int | None, dict[str, Any] | None]:
    """(split seed, dev_split record) of the run that trained the checkpoint at `ckpt_path`, if known.

    `ckpt_path` is a run dir or its checkpoints/<name>. A run from before task.split_seed carved with its
    run seed, so that seed is its split seed. (None, None) for another task's run or a bare checkpoint.
    """
    path = Path(ckpt_path)
    for run in (path, path.parent.parent) if path.parent.name == "checkpoints" else (path,):
        if (run / "run_info.json").is_file():
            info = json.loads((run / "run_info.json").read_text())
            if info.get("task") not in (None, task):
                return None, None
            split = info.get("dev_split")
            if split is not None and split.get("task") == task:
                return int(split["split_seed"]), split
            seed = info.get("split_seed", info.get("seed"))
            return (None if seed is None else int(seed)), None
    return None, None


def trained_selection(ckpt_path: str, task: str) -> str | None:
    """task.selection (dev | carve) recorded by the run that trained `ckpt_path` (a run dir or its
    checkpoints/<name>) on `task`, or None (a bare checkpoint, a run from before task.selection, or a run of
    another task: its selection says nothing about this task's splits)."""
    path = Path(ckpt_path)
    for run in (path, path.parent.parent) if path.parent.name == "checkpoints" else (path,):
        if (run / "run_info.json").is_file():
            info = json.loads((run / "run_info.json").read_text())
            return info.get("selection") if info.get("task") in (None, task) else None
    return None
