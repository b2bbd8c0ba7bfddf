"""Experiment trackers (`logger=[csv,tensorboard,mlflow,wandb]`): sinks the run directory fans its records out to.

metrics.jsonl, metrics.json and run_info.json stay the record of truth; a tracker gets a copy of each, so a
lab can watch curves and compare runs in the tool it already uses. Ownership: `RunDir` (robustft/rundir.py)
builds the trackers, hands each its folder inside the run directory (`<run dir>/<name>/`; MLflow's default
local store sits at the sweep directory, shared by the sweep's jobs) and persists their resume state
(`trackers.json`: the rows forwarded so far, W&B / MLflow run ids). A tracker writes only in the folder it is
handed, through its library; nothing else of robustft writes there.

Resume without duplicate steps: a resumed run drops the metrics.jsonl rows logged after its checkpoint and logs
them again with the same values (exact resume), so `Trackers` forwards a row only when its index in
metrics.jsonl is past what the tracker already has, and back-fills from metrics.jsonl any row a killed
process had written but not yet forwarded.

This module imports no tracker library: `check` (the pre-flight, robustft/validate.py) only finds them.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustft.errors import UserError

log = logging.getLogger("robustft")

EXTRA = "pip install -e '.[loggers]'"
CLOSE_TIMEOUT_S = 120
HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_"}


@dataclass
class RunMeta:
    """What every tracker is told about the run (the same fields under each tracker's own names)."""

    name: str  # the tracker's run name: "<group>/seed=<seed>"
    group: str  # the configuration without its seed (Hydra's override dirname): a sweep's seeds share it
    experiment: str  # the recipe (`experiment=...`), else "robustft"
    seed: int
    run_dir: Path
    store: Path  # a local tracker store's default home: the sweep directory in a sweep, else the run dir
    params: dict[str, Any]  # the resolved config, flattened to dotted keys
    tags: dict[str, str] = field(default_factory=dict)  # git sha, task, method, model, run dir, status


class Tracker:
    """One tracker library. Subclasses take their library's options as keyword arguments (the YAML's keys);
    the methods get plain floats, already batched (no tensors, no host syncs)."""

    module = ""  # the Python module the tracker needs (its missing-package error names the extra)

    def open(self, meta: RunMeta, folder: Path, state: dict[str, Any] | None) -> dict[str, Any]:
        """Create the tracker run (or continue the one in `state`, a previous attempt's); return the state
        to persist for a resume (e.g. the run id)."""
        raise NotImplementedError

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Curve points: (global step, {"<split>/<name>": value}) in metrics.jsonl order."""
        raise NotImplementedError

    def log_final(self, metrics: dict[str, float]) -> None:
        """metrics.json: the final metrics (best checkpoint, evaluators, cost), may come in several calls."""
        raise NotImplementedError

    def close(self, status: str, tags: dict[str, str]) -> None:
        """End the tracker run with run_info's status (completed | failed | interrupted)."""
        raise NotImplementedError


def run_meta(cfg: Any, run_dir: Path, hydra_cfg: Any) -> RunMeta:
    """The run's names for the trackers from Hydra's job config: the group is the job's overrides without
    those the sweep folder names leave out (seed, paths, tag: conf/hydra/default.yaml) and the logger's own,
    so the seeds of one configuration share it whether they ran in one sweep, several, or one by one."""
    from omegaconf import OmegaConf

    exclude = set(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys", default=None) or [])
    kept = [str(o) for o in OmegaConf.select(hydra_cfg, "overrides.task", default=None) or []
            if (key := str(o).split("=", 1)[0].lstrip("+~")) not in exclude and key.split(".")[0] not in ("logger", "hydra")]
    group = ",".join(sorted(kept)) or "default"
    experiment = OmegaConf.select(hydra_cfg, "runtime.choices.experiment", default=None) or "robustft"
    sweep = str(OmegaConf.select(hydra_cfg, "mode", default="")).endswith("MULTIRUN")
    store = Path(str(hydra_cfg.sweep.dir)) if sweep else Path(run_dir)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    tags = {"task": str(cfg.task.name), "method": str(cfg.method.name), "model": str(cfg.model.name),
            "seed": str(cfg.seed), "group": group, "run_dir": str(Path(run_dir).resolve())}
    return RunMeta(f"{group}/seed={cfg.seed}", group, str(experiment), int(cfg.seed), Path(run_dir).resolve(),
                   store.resolve(), params, tags)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists become their string form (trackers take scalars as parameters)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = obj if obj is None or isinstance(obj, (bool, int, float, str)) else str(obj)
    return out


def curve_point(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl row as (step, {"<split>/<key>": value}) with its numbers only."""
    split = str(row.get("split", "train"))
    values = {f"{split}/{k}": float(v) for k, v in row.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(row.get("step", 0)), values


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tracker_class(key: str, node: Mapping[str, Any]) -> type[Tracker]:
    from hydra.utils import get_class

    target = node.get("_target_")
    try:
        return get_class(str(target))
    except (ImportError, ValueError) as e:
        raise UserError(f"logger.{key}._target_={target} cannot be imported ({str(e).splitlines()[0]}); "
                        "fix _target_ in its YAML") from None


def check(section: Mapping[str, Any] | None) -> None:
    """Each selected logger: its options are its class's keyword arguments, its library is installed."""
    for key, node in (section or {}).items():
        cls = _tracker_class(key, node)
        takes = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
        for option in node:
            if option not in takes and option not in HYDRA_KEYS:
                raise UserError(f"unknown option 'logger.{key}.{option}'; logger={key} takes: {', '.join(sorted(takes))}")
        if cls.module and importlib.util.find_spec(cls.module) is None:
            raise UserError(f"logger={key} needs the {cls.module} package, which is not installed; {EXTRA}")


def build(section: Mapping[str, Any] | None) -> dict[str, Tracker]:
    """The selected trackers, keyed by their logger name (also the name of their folder in the run dir)."""
    check(section)
    out: dict[str, Tracker] = {}
    for key, node in (section or {}).items():
        options = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
        out[str(key)] = _tracker_class(key, node)(**options)
    return out


class Trackers:
    """The fan-out RunDir calls: rows are batched (flushed every `flush_rows` rows or `flush_secs` seconds,
    and before final metrics and the end) and sent by one background thread, in order; a tracker that fails
    after its start is dropped with a warning, since metrics.jsonl already holds the record and a network
    error must not end a training run."""

    def __init__(self, trackers: dict[str, Tracker], meta: RunMeta, state: dict[str, Any],
                 read_rows: Callable[[int, int], list[dict[str, Any]]], save_state: Callable[[dict[str, Any]], None],
                 fresh: bool = True, flush_rows: int = 50, flush_secs: float = 10.0) -> None:
        self.trackers, self.meta, self.state, self.fresh = trackers, meta, dict(state), fresh
        self.read_rows, self.save_state = read_rows, save_state
        self.flush_rows, self.flush_secs = flush_rows, flush_secs
        self.sent = int(self.state.get("rows", 0))  # metrics.jsonl rows every tracker has
        self.buffer: list[tuple[int, dict[str, float]]] = []
        self.last_flush = time.monotonic()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None

    def open(self, folder_of: Callable[[str], Path]) -> None:
        """Start (or continue) every tracker run; a failure here is the run's failure (a wrong URI, ...)."""
        # a resumed run keeps its first attempt's names, even if its command line differs (an added override)
        first = self.state.setdefault("run", {"name": self.meta.name, "group": self.meta.group})
        self.meta.name, self.meta.group = first["name"], first["group"]
        self.meta.tags["group"] = first["group"]
        opened: dict[str, Tracker] = {}
        for name, tracker in self.trackers.items():
            try:
                self.state[name] = tracker.open(self.meta, folder_of(name), self.state.get(name))
            except Exception as e:  # the library's own error (unreachable server, bad option value)
                self.trackers = opened
                self._each("close", "failed", {**self.meta.tags, "status": "failed"})  # those already started
                if isinstance(e, UserError):
                    raise
                reason = str(e).splitlines()[0][:200] if str(e) else ""
                raise UserError(f"logger={name} could not start ({type(e).__name__}: {reason}); "
                                f"check the logger.{name} options") from e
            opened[name] = tracker
        self.save_state(self.state)

    def log(self, row: dict[str, Any], index: int) -> None:
        """metrics.jsonl row number `index` (0-based); rows the trackers already have are skipped."""
        if index < self.sent + len(self.buffer):
            return  # a resumed run logs again what came after its checkpoint: same values, already sent
        missing = self.read_rows(self.sent + len(self.buffer), index)  # written by a killed process, never sent
        self.buffer += [curve_point(r) for r in missing] + [curve_point(row)]
        if len(self.buffer) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_secs:
            self.flush()

    def truncated(self, rows: int) -> None:
        """metrics.jsonl was cut to `rows` rows. A resumed tracker run keeps what it has (the rows come again,
        equal); a new one (resume=never, or no trackers.json) was never sent the cut rows of the old record."""
        if self.fresh:
            self.sent = min(self.sent, rows)
            self.buffer = self.buffer[: max(0, rows - self.sent)]

    def flush(self) -> None:
        """Hand the buffered rows to the sender thread; trackers.json counts them once every tracker has them."""
        if self.buffer:
            self.sent += len(self.buffer)
            self._submit(self._send_rows, self.buffer, self.sent)
            self.buffer = []
        self.last_flush = time.monotonic()

    def _send_rows(self, rows: list[tuple[int, dict[str, float]]], sent: int) -> None:
        self._each("log_rows", rows)
        self.state["rows"] = sent
        self.save_state(dict(self.state))

    def final(self, metrics: dict[str, Any]) -> None:
        self.flush()
        self._submit(self._each, "log_final", numbers(metrics))

    def close(self, status: str, info: Mapping[str, Any], rows: int) -> None:
        """Forward what is left (back-filled up to `rows`, metrics.jsonl's length), end every tracker run and
        wait for the sender thread (at most `CLOSE_TIMEOUT_S`: a hung server must not hold the run's exit)."""
        if rows > self.sent + len(self.buffer):
            self.buffer += [curve_point(r) for r in self.read_rows(self.sent + len(self.buffer), rows)]
        self.flush()
        tags = {**self.meta.tags, "status": status, "git_sha": str(info.get("git_sha"))}
        self._submit(self._each, "close", status, tags)
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(CLOSE_TIMEOUT_S)
            if self._worker.is_alive():
                log.warning("trackers still sending after %d s; their runs may lack the last rows or status "
                            "(metrics.jsonl and run_info.json have them)", CLOSE_TIMEOUT_S)
            self._worker = None

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the sender thread, in order: a tracker's network or disk wait (an SQLite commit,
        an HTTP request) never stalls a training step."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="robustft-trackers", daemon=True)
            self._worker.start()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            fn, args = task
            fn(*args)

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                log.warning("logger=%s failed (%s: %s); it is dropped for the rest of this run, metrics.jsonl "
                            "still has every row", name, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                del self.trackers[name]
