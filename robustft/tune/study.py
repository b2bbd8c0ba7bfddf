"""Study storage and bookkeeping shared by every worker of a search.

Storage (`hydra.sweeper.storage`): null = an SQLite file `optuna.db` in the sweep dir; `journal:<file>` (or
a path ending in .log/.journal) = Optuna's JournalFileBackend, an append-only file that several workers on
a shared filesystem (NFS, Lustre) can write without a database server; anything else = an RDB URL
(`sqlite:///...`, `postgresql://...`).

Budget: a study's trials that count are every trial except (a) a trial whose worker died while it ran,
which is marked FAIL with user attr `rft_retried` and re-queued with the same parameters and run folder
(so its run resumes from checkpoints/last), and (b) a surplus trial (`rft_surplus`): two workers asked at
once for the last slot, the later number is told FAIL without running. So a search of T trials ends with
T counted trials (COMPLETE, or FAIL for a run that failed, e.g. exit 2) whatever was interrupted.

A running trial carries `rft_worker` (host:pid) and `rft_heartbeat` (unix time, renewed every
`heartbeat_s` by its worker). It is stale, and recovered as in (a), when its worker is a dead process on
this host, or when its heartbeat is older than `grace_s` (another host).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("robustft")

RETRIED, SURPLUS, WORKER, HEARTBEAT, RUN_DIR = "rft_retried", "rft_surplus", "rft_worker", "rft_heartbeat", "rft_dir"


def make_storage(spec: str | None, sweep_dir: Path) -> tuple[Any, str]:
    """Optuna storage object and a printable description from `hydra.sweeper.storage`."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if not spec:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        spec = f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    if spec.startswith("journal:") or spec.endswith((".log", ".journal")):
        path = Path(spec.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if spec.startswith("sqlite:///"):
        Path(spec[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(spec), spec


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def counted(trials: list[Any]) -> list[Any]:
    """The trials that use the budget (see the module docstring)."""
    return [t for t in trials if not t.user_attrs.get(RETRIED) and not t.user_attrs.get(SURPLUS)]


def is_stale(trial: Any, grace_s: float, now: float) -> bool:
    worker = str(trial.user_attrs.get(WORKER, ""))
    host, _, pid = worker.rpartition(":")
    if worker == worker_id():
        return False
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    beat = trial.user_attrs.get(HEARTBEAT)
    return beat is not None and now - float(beat) > grace_s


def recover_stale(study: Any, grace_s: float) -> int:
    """Fail and re-queue (same params, same run folder) the RUNNING trials whose worker is gone."""
    from optuna.trial import TrialState

    n = 0
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, grace_s, now):
            continue
        try:  # another worker may recover it at the same moment: the first tell wins
            study._storage.set_trial_user_attr(t._trial_id, RETRIED, True)
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            continue
        study.enqueue_trial(dict(t.params), user_attrs={RUN_DIR: t.user_attrs.get(RUN_DIR), "rft_retry_of": t.number},
                            skip_if_exists=False)
        log.warning("study %s: trial %d was running when its worker (%s) stopped; re-queued with the same "
                    "parameters (its run resumes from its checkpoint)", study.study_name, t.number,
                    t.user_attrs.get(WORKER))
        n += 1
    return n


def slot(study: Any, trial: Any, budget: int) -> bool:
    """Whether `trial` (just asked) is within the budget: fewer than `budget` counted trials numbered before it."""
    before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
    return len(before) < budget


class Heartbeat:
    """Renews `rft_heartbeat` of the trials this worker runs, in a thread, while a batch is out."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trials: list[Any] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        now = time.time()
        for trial in list(self.trials):
            with contextlib.suppress(Exception):  # a finished trial refuses attrs; a storage hiccup is retried
                trial.set_user_attr(HEARTBEAT, now)

    def __enter__(self) -> Heartbeat:
        self._stop.clear()
        self.beat()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.beat()

        self._thread = threading.Thread(target=loop, name="optuna-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.trials = []
