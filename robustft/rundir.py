"""The run directory: run_info.json (status, provenance, timings), metrics.json, metrics.jsonl, splits.json.

Every file is written atomically (temp file + rename), so a killed run never leaves half a JSON.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustft.data import DevCarve

PACKAGES = ["robustft", "torch", "transformers", "datasets", "evaluate", "hydra-core", "safetensors", "numpy"]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


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


class RunDir:
    """Owns the files of one run; `status` goes running -> completed | failed | interrupted."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.info_path = self.path / "run_info.json"
        self.info: dict[str, Any] = json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}
        self._t0 = time.time()

    def start(self, seed: int, **fields: Any) -> None:
        attempts = self.info.get("attempts", 0) + 1
        self.info.pop("error", None)  # a previous attempt's error does not belong to this one
        self.info.update(
            status="running",
            seed=seed,
            git_sha=git_sha(),
            versions=versions(),
            host=socket.gethostname(),
            argv=sys.argv,
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            started_at=self.info.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            attempts=attempts,
            **fields,
        )
        self.save_info()

    def update(self, **fields: Any) -> None:
        self.info.update(fields)
        self.save_info()

    def finish(self, status: str, error: str | None = None) -> None:
        self.info["status"] = status
        self.info["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.info["wall_time_s"] = round(self.info.get("wall_time_s_before", 0.0) + time.time() - self._t0, 3)
        if error:
            self.info["error"] = error
        self.save_info()

    def save_info(self) -> None:
        write_json(self.info_path, self.info)

    def log(self, row: dict[str, Any]) -> None:
        """Append one curve row to metrics.jsonl (a line is written whole or not at all)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def write_metrics(self, metrics: dict[str, float]) -> None:
        """Merge into metrics.json (flat `split/metric` keys); evaluators add their own keys later."""
        path = self.path / "metrics.json"
        current = json.loads(path.read_text()) if path.is_file() else {}
        current.update(metrics)
        write_json(path, current)

    def write_dev_split(self, task: str, carve: DevCarve) -> None:
        """splits.json holds the carved dev ids (local SNLI: 9,842); run_info.json only their count and hash."""
        record = {"task": task, **carve.summary()}
        write_json(self.path / "splits.json", {"validation": {**record, "carved_from": "train", "idx": carve.ids}})
        self.update(dev_split={**record, "file": "splits.json"})


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
