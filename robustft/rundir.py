"""The run directory and its one writer: run_info.json (status, provenance, timings), metrics.json,
metrics.jsonl, checkpoints/, training_dynamics/, eval/<evaluator>/samples.jsonl, splits.json, stages/ and
the records methods and stresses return (selection.json, ...).

Only `RunDir` writes inside a run directory: the loop, methods, stresses and evaluators hand it data.
Every file is written atomically (temp file + rename), so a killed run never leaves half a JSON.

In a data-parallel run (robustft/distributed.py) only rank 0's `RunDir` writes: every other rank's keeps
run_info in memory and drops the writes, so the loop, runner and evaluators call it alike on every rank.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustft.data import DevCarve

from robustft import distributed
from robustft.errors import Interrupted, UserError, signal_unmasked
from robustft.provenance import git_sha, slurm_job_id, versions

MIN_FREE_BYTES = 16 << 20  # below this a run cannot write even its config and first log lines: "disk full"
# OSErrors that mean "this place cannot be written" (the user's fix), as opposed to a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def write_error(e: OSError, key: str, run_path: Path | None = None) -> str | None:
    """One line for an OSError writing the run (full disk, read-only, a file in the way), else None.

    `key` names the setting that moves the output, e.g. hydra.run.dir (hydra.sweep.dir in a sweep). A
    permission error on a file outside `run_path` (a data file, a cache) is not the run dir's fault:
    that line names the file without suggesting to move the run.
    """
    if e.errno not in WRITE_ERRNOS:
        return None
    where, reason = e.filename or run_path or "the run directory", e.strerror or os.strerror(e.errno)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {where} ({reason}); free disk space or set {key} to another disk"
    inside = e.filename is None or run_path is None or Path(os.path.abspath(e.filename)).is_relative_to(
        Path(run_path).absolute())
    if not inside:
        return f"cannot access {where} ({reason}); fix its permissions, or point the setting that names it elsewhere"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot write {where} ({reason}); remove the file in the way or set {key} to another folder"
    return f"cannot write {where} ({reason}); set {key} to a writable folder"


def check_output_dir(path: str | Path, key: str) -> None:
    """Fail before Hydra creates `path` when it cannot be created or written, or its disk is full.

    Hydra makes the folder and writes .hydra/ and the log before robustft's code runs, so these would
    otherwise be tracebacks. Probes with a temporary file (os.access is true for root on a read-only tree).
    """
    import shutil
    import tempfile

    from robustft.errors import UserError

    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create {target}: {existing} is a file, not a folder; remove it or set {key} elsewhere")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        e.filename = e.filename or str(existing)
        raise UserError(write_error(e, key) or f"cannot write {existing} ({e}); set {key} to a writable folder") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"cannot write {target}: the disk holding {existing} is full ({free >> 10} KiB free); "
                        f"free disk space or set {key} to another disk")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, path)


class RunDir:
    """Owns the files of one run; `status` goes running -> completed | failed | interrupted.

    `writer` False (default: every rank but 0 of a data-parallel run) reads but never writes: the same
    calls keep `info` and `log_rows` in memory, so every rank runs the same code.
    """

    def __init__(self, path: str | Path, writer: bool | None = None) -> None:
        self.path = Path(path)
        self.writer = distributed.is_main() if writer is None else writer
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
        self.info_path = self.path / "run_info.json"
        self.info: dict[str, Any] = json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}
        self._t0 = time.time()
        log = self.path / "metrics.jsonl"
        self.log_rows = sum(1 for _ in open(log)) if log.is_file() else 0  # rows in metrics.jsonl
        self.trackers: Any = None  # robustft.loggers.base.Trackers once attach_trackers found `logger=[...]`

    @contextlib.contextmanager
    def hold(self, dir_key: str) -> Iterator[None]:
        """An exclusive lock on the folder while this process runs in it; a second run gets a UserError naming
        the holder. flock: the kernel drops a dead process's lock, so a killed run's folder is taken over."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking (as stages.file_lock)
            fcntl = None
        if not self.writer or fcntl is None:  # rank 0 holds it for the whole data-parallel run
            yield
            return
        with open(self.path / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise UserError(f"run directory {self.path} is in use by {holder}; wait for that run to end, or set "
                                f"{dir_key} to another folder") from None
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield  # closing the file releases the lock

    def claim_config(self, cfg: Any, start_over: bool, dir_key: str) -> None:
        """run_config.yaml: the config of the folder's first start (or of `start_over`, resume=never); a rerun or
        resume with another config (robustft/runconfig.py says which options may differ) is a UserError."""
        from omegaconf import OmegaConf

        from robustft import runconfig

        path = self.path / "run_config.yaml"
        if path.is_file() and not start_over:
            diffs = runconfig.differences(runconfig.comparable(OmegaConf.to_container(OmegaConf.load(path))),
                                          runconfig.comparable(cfg))
            if diffs:
                raise UserError(runconfig.mismatch_message(str(self.path), diffs, dir_key))
            return
        self.write_record(path.name, OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))

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
            slurm_job_id=slurm_job_id(),
            started_at=self.info.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            attempts=attempts,
            **fields,
        )
        self.save_info()
        self._open_trackers()

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
        if self.trackers is not None:  # every tracker run ends with this status, also a failed or interrupted one
            trackers, self.trackers = self.trackers, None
            trackers.close(status, self.info, self.log_rows)

    def save_info(self) -> None:
        if self.writer:
            write_json(self.info_path, self.info)

    def log(self, row: dict[str, Any]) -> None:
        """Append one curve row to metrics.jsonl (a line is written whole or not at all)."""
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
        if self.trackers is not None:
            self.trackers.log(row, self.log_rows)
        self.log_rows += 1

    def truncate_log(self, rows: int) -> None:
        """Keep the first `rows` rows of metrics.jsonl: a resumed run logs the later ones again."""
        path = self.path / "metrics.jsonl"
        if not self.writer:
            self.log_rows = min(self.log_rows, rows)
            return
        if not path.is_file() or self.log_rows <= rows:
            return
        kept = path.read_text().splitlines(keepends=True)[:rows]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.log_rows = len(kept)
        if self.trackers is not None:
            self.trackers.truncated(self.log_rows)

    def start_over(self) -> None:
        """Training starts from step 0 (resume=never, or no checkpoint yet): the curves, final metrics and
        checkpoints of an earlier attempt in this folder go, so the record is this attempt's alone (and a kill
        before this attempt's first checkpoint cannot resume from an older config's)."""
        self.truncate_log(0)
        if self.writer:
            (self.path / "metrics.json").unlink(missing_ok=True)
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def write_metrics(self, metrics: dict[str, float]) -> None:
        """Merge into metrics.json (flat `split/metric` keys); evaluators add their own keys later."""
        path = self.path / "metrics.json"
        if not self.writer:
            return
        current = json.loads(path.read_text()) if path.is_file() else {}
        current.update(metrics)
        write_json(path, current)
        if self.trackers is not None:
            self.trackers.final(metrics)

    # --- experiment trackers (robustft/loggers/): sinks this run directory fans its records out to -----
    def attach_trackers(self, cfg: Any, meta: Any) -> None:
        """Build the `logger=[...]` trackers (rank 0 only); `start` opens their runs, `finish` ends them.

        RunDir owns them: it hands each its folder `<run dir>/<logger name>/` and keeps their resume state
        (rows forwarded, tracker run ids) in trackers.json, so a resumed run continues the same tracker run.
        """
        if not self.writer or not cfg.get("logger"):
            return
        from robustft.loggers.base import Trackers, build

        path = self.path / "trackers.json"
        resume = cfg.get("resume") == "auto" and path.is_file()
        # a new tracker run gets the rows already in metrics.jsonl (an earlier attempt's, when resume=auto), not
        # those of a record resume=never starts over
        state = json.loads(path.read_text()) if resume else {"rows": self.log_rows if cfg.get("resume") == "never" else 0}
        self.trackers = Trackers(build(cfg.logger), meta, state, self._read_rows,
                                 lambda s: write_json(path, s), fresh=not resume)

    def _open_trackers(self) -> None:
        if self.trackers is None:
            return
        try:
            self.trackers.open(lambda name: self.path / name)
        except BaseException:
            self.trackers = None
            raise

    def _read_rows(self, start: int, end: int) -> list[dict[str, Any]]:
        """metrics.jsonl rows [start, end): for a tracker that missed them (a killed process never sent them)."""
        path = self.path / "metrics.jsonl"
        if end <= start or not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text().splitlines()[start:end]]

    # --- files handed over by the loop, methods, stresses and evaluators --------------------------------
    def save_checkpoint(self, name: str, model, tokenizer, state: dict[str, Any] | None) -> Path:
        """checkpoints/<name>: a `save_pretrained` folder (+ training state), swapped in atomically."""
        from robustft import checkpoint as ckpt  # torch: imported when a run saves, not by the CLI

        path = self.path / "checkpoints" / name
        if self.writer:  # the weights are the same on every rank of a data-parallel run
            ckpt.save_checkpoint(path, model, tokenizer, state)
        return path

    def prune_checkpoints(self, keep: str) -> None:
        """Drop what `trainer.keep_checkpoints` (best | none) does not keep, once the run is scored: a sweep of
        many runs for a report needs only the records. `best` keeps checkpoints/last when there is no best."""
        folder = self.path / "checkpoints"
        if not self.writer or not folder.is_dir():
            return
        if keep == "none":
            shutil.rmtree(folder)
        elif (folder / "best").is_dir():
            shutil.rmtree(folder / "last", ignore_errors=True)

    def rank_log(self, rank: int) -> Path:
        """logs/rank<r>.log: the log file of rank r > 0 of a data-parallel run (rank 0 logs to robustft.log);
        each rank creates and writes only its own."""
        folder = self.path / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"rank{rank}.log"

    def last_checkpoint(self) -> Path | None:
        from robustft import checkpoint as ckpt

        return ckpt.find_checkpoint(self.path / "checkpoints" / "last")

    def write_dynamics(self, epoch: int, rows: list[dict[str, Any]]) -> Path:
        """training_dynamics/dynamics_epoch_{epoch}.jsonl in allenai/cartography's format."""
        folder = self.path / "training_dynamics"
        path = folder / f"dynamics_epoch_{epoch}.jsonl"
        if self.writer:
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, rows)
        return path

    def write_record(self, name: str, obj: Any) -> Path:
        """A record file (relative path): `.json` for an object, `.jsonl` for a list of rows, `.yaml` a config."""
        path = self.path / name
        if not self.writer:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            write_jsonl(path, list(obj))
        elif name.endswith(".yaml"):  # a config
            from omegaconf import OmegaConf

            tmp = path.with_name(f".{path.name}.tmp")
            OmegaConf.save(obj, tmp)
            os.replace(tmp, path)
        else:
            write_json(path, obj)
        return path

    def stage_status(self, name: str, status: str, **fields: Any) -> None:
        """run_info.json stages.<name>: a stage's status (and fields) inside this run."""
        stages = dict(self.info.get("stages") or {})
        stages[name] = {**stages.get(name, {}), "status": status, **fields}
        self.update(stages=stages)

    def link_stage(self, name: str, target: Path) -> Path:
        """stages/<name> -> the stage's own run directory (a symlink; a pointer file where links fail)."""
        folder = self.path / "stages"
        link = folder / name
        if not self.writer:
            return link
        folder.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        try:
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
        except OSError:
            link.write_text(str(Path(target).resolve()) + "\n")
        return link

    def write_dev_split(self, task: str, carve: DevCarve) -> None:
        """splits.json holds the carved dev ids (local SNLI: 9,842); run_info.json only their count and hash."""
        record = {"task": task, **carve.summary()}
        if self.writer:
            write_json(self.path / "splits.json", {"validation": {**record, "carved_from": "train", "idx": carve.ids}})
        self.update(dev_split={**record, "file": "splits.json"})


@contextlib.contextmanager
def lifecycle(run: RunDir, cfg: Any, method_name: str | None = None) -> Iterator[None]:
    """run_info.json status around a run or a stage: running -> completed | failed | interrupted."""
    run.start(seed=int(cfg.seed), task=cfg.task.name, method=method_name or cfg.method.name, model=cfg.model.name,
              tag=cfg.get("tag"), wall_time_s_before=run.info.get("wall_time_s", 0.0))
    if cfg.get("tuned_from") is not None:  # a tuned protocol's final run: the study trial it re-runs
        from omegaconf import OmegaConf

        tuned = cfg.tuned_from
        run.update(tuned_from=OmegaConf.to_container(tuned) if OmegaConf.is_config(tuned) else tuned)
    try:
        with signal_unmasked():  # a signal that a library turned into its own error is still the signal
            yield
    except Interrupted as e:
        run.finish("interrupted", str(e))
        raise
    except UserError as e:
        run.finish("failed", str(e))
        raise
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or submitit's handler exiting before a requeue
        run.finish("interrupted", f"{type(e).__name__}: {e}")
        raise
    except BaseException as e:
        run.finish("failed", f"{type(e).__name__}: {e}")
        raise
    run.finish("completed")
