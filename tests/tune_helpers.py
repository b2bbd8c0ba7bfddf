"""Drive robustft.tune's search without training: a stand-in launcher that writes each trial's records.

The objective is a known function of the sampled parameters, so a test can tell which split was read.
Kept apart from tests/test_tune.py so the two-worker test's processes can import it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any


def job_params(job: list[str]) -> tuple[dict[str, str], str]:
    subdir = next(o.split("=", 1)[1].strip("'") for o in job if o.startswith("hydra.sweep.subdir="))
    return dict(o.split("=", 1) for o in job if not o.startswith("hydra.")), subdir


def score(params: dict[str, str]) -> float:
    """A selection-split score that depends on the trial's parameters (and nothing else)."""
    lr = float(params.get("trainer.lr", "1e-4"))
    return round(1.0 - abs(math.log10(lr) + 4.0) / 10 + 0.01 * float(params.get("method.alpha", 0)), 6)


def fake_launch(sweep_dir: Path, fail_if: Any = None, delay_s: float = 0.0, log: list | None = None) -> Any:
    """launch(jobs, idx) writing run_info.json + metrics.json as a completed (or failed) run would."""

    def launch(jobs: list[list[str]], idx: int) -> None:
        for job in jobs:
            params, subdir = job_params(job)
            if log is not None:
                log.append((subdir, params))
            time.sleep(delay_s)
            run = sweep_dir / subdir
            run.mkdir(parents=True, exist_ok=True)
            failed = fail_if is not None and fail_if(params, subdir)
            info = {"status": "failed" if failed else "completed", "main_metric": "validation/accuracy",
                    "error": "trainer.lr=... must be >= 0; ..." if failed else None}
            (run / "run_info.json").write_text(json.dumps(info))
            if not failed:  # test/* is the held-out split: a different number the search must never use
                s = score(params)
                (run / "metrics.json").write_text(json.dumps({"validation/accuracy": s, "test/accuracy": 1 - s}))

    return launch


def options(**kw: Any) -> Any:
    from optuna.samplers import RandomSampler

    from robustft.tune.sweep import Options

    base = dict(stage="search", n_trials=3, n_jobs=1, storage=None, study_name="t",
                sampler=functools.partial(RandomSampler, seed=kw.pop("seed", 0)), direction="maximize",
                objective_split="validation", heartbeat_s=1.0, grace_s=30.0, params={})
    return Options(**{**base, **kw})


def compose(overrides: list[str]) -> Any:
    return _compose(tuple(overrides))


@functools.lru_cache(maxsize=64)
def _compose(overrides: tuple[str, ...]) -> Any:
    """Composed once per override list in a test process (the search only reads it)."""
    from robustft.config import compose_config

    return compose_config(["model=tiny_random", *overrides])


def run_search(sweep_dir: Path, argv: list[str], launch: Any = None, **kw: Any) -> tuple[Any, list]:
    """plan + open_studies + search with the stand-in launcher; returns (options, cells)."""
    from robustft.tune import sweep as tune

    o = options(**kw)
    cells, fixed, seeds = tune.plan(o, argv, compose)
    tune.open_studies(o, cells, sweep_dir)
    tune.search(o, cells, fixed, seeds, sweep_dir, launch or fake_launch(sweep_dir))
    return o, cells


def worker(sweep_dir: str, storage: str, ready: str, n_trials: int) -> None:
    """One of two search processes on one journal file: waits for the other, then searches."""
    Path(ready).touch()
    while len(list(Path(ready).parent.glob("ready*"))) < 2:
        time.sleep(0.05)
    run_search(Path(sweep_dir), ["method=vanilla"], launch=fake_launch(Path(sweep_dir), delay_s=0.3),
               n_trials=n_trials, storage=storage)
