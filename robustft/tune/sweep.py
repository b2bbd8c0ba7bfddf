"""The search and the final seeds, driven by the Hydra sweeper plugin `hydra/sweeper=optuna`.

`stage=search`: every cell of the grid (a plain comma list such as `arm=a,b,c`; one study per cell) gets the
same budget of `n_trials` trials, asked round-robin from the cell with the fewest trials so a stopped search
is balanced; `n_jobs` trials at a time go out as one launcher batch (basic, submitit_local, slurm). Each trial
is a normal robustft run in `<sweep dir>/trials/<cell>/<number>`; its objective is its `metrics.json` value of
`run_info.json` `main_metric`, which must be on the selection split (`objective_split`, `validation`):
the held-out `test/*` is never read. A run that fails (exit 2, status failed) is told FAIL and the search
goes on. Only this process samples: a trial's ranks (a data-parallel SLURM job) receive plain overrides.

`stage=final`: the best trial of each cell re-run for every seed of the grid's `seed` list in
`<sweep dir>/final/<cell>/seed=<s>`, each recording `tuned_from` (storage, study, trial, value) in
run_info.json. Both stages are resumable by rerunning the same command with the same `hydra.sweep.dir`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError
from robustft.tune import space as sp
from robustft.tune import study as st

log = logging.getLogger("robustft")


@dataclass
class Cell:
    """One grid cell (e.g. arm=r3f): its study and search space."""

    label: str
    overrides: list[str]
    space: dict[str, Any] = field(default_factory=dict)
    study: Any = None


@dataclass
class Options:
    stage: str
    n_trials: int
    n_jobs: int
    storage: str | None
    study_name: str
    sampler: Any  # functools.partial of an Optuna sampler (`_partial_: true`); called with a seed per trial
    direction: str
    objective_split: str
    heartbeat_s: float
    grace_s: float
    params: dict[str, Any]
    trial_overrides: list[str] = field(default_factory=list)


def check_options(o: Options) -> None:
    if o.stage not in ("search", "final"):
        raise UserError(f"hydra.sweeper.stage={o.stage} is not a stage; use search (the trials) or final (the seeds)")
    for key in ("n_trials", "n_jobs"):
        if not isinstance(getattr(o, key), int) or getattr(o, key) < 1:
            raise UserError(f"hydra.sweeper.{key}={getattr(o, key)} must be a whole number >= 1; e.g. hydra.sweeper.{key}=4")
    if o.direction not in ("maximize", "minimize"):
        raise UserError(f"hydra.sweeper.direction={o.direction} is not a direction; use maximize or minimize")
    if o.objective_split == "test":
        raise UserError("hydra.sweeper.objective_split=test would tune on the held-out split; use validation")


def merge_params(recipe: tuple[dict, dict, dict], command_line: tuple[dict, dict, dict]) -> tuple[dict, dict, dict]:
    """(space, grid, fixed) of hydra.sweeper.params and of the command line, the command line's key winning, as
    in Hydra's BasicSweeper. A single value of a key the recipe sweeps as a grid narrows that grid: `arm=pgd`
    is the cell `arm=pgd` (its study `robustft/arm=pgd`, the recipe's grid order kept), not a fixed override
    added to every arm of the recipe's list, which is what it was."""
    space, grid, fixed = (dict(kind) for kind in command_line)
    for key in [k for k, line in fixed.items() if k in recipe[1] and not line.startswith(("~", "+"))]:
        grid[key] = [fixed.pop(key).split("=", 1)[1]]
    given = {*space, *grid, *fixed}
    merged = []
    for mine, cli in zip(recipe, (space, grid, fixed)):
        kind = {k: cli.get(k, v) for k, v in mine.items() if k in cli or k not in given}
        merged.append({**kind, **{k: v for k, v in cli.items() if k not in kind}})
    return merged[0], merged[1], merged[2]


def plan(o: Options, arguments: list[str], compose: Any) -> tuple[list[Cell], list[str], list[str]]:
    """Cells (with their spaces), fixed overrides and seeds from the sweeper params and the command line."""
    cli_space, grid, fixed = merge_params(sp.classify([f"{k}={v}" for k, v in (o.params or {}).items()]),
                                          sp.classify(list(arguments)))
    seeds = grid.pop("seed", None) or ([fixed.pop("seed").split("=", 1)[1]] if "seed" in fixed else [])
    fixed_lines = list(fixed.values())
    cells = []
    for values in itertools.product(*grid.values()):
        overrides = [f"{k}={v}" for k, v in zip(grid, values)]
        cells.append(Cell(",".join(overrides) or "default", overrides))
    for cell in cells:
        cfg = compose(cell.overrides + fixed_lines + [f"seed={seeds[0]}"] if seeds else cell.overrides + fixed_lines)
        cell.space = {**sp.config_space(cfg), **cli_space}
        for key in cell.space:
            if key in grid or key in fixed or key == "seed":
                raise UserError(f"{key} is both searched and set ({key}=...); drop one of them")
            if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
                raise UserError(f"search key {key} is not an option of {cell.label} ({cfg.method.name}); "
                                "check the spelling in conf/search/ or on the command line (robustft --cfg job)")
        if o.stage == "search" and not cell.space:
            raise UserError(f"nothing to search for {cell.label}: no search space (conf/search/method/"
                            f"{cfg.method.name}.yaml); add one, e.g. search.trainer.lr='tag(log,interval(1e-5,1e-3))'")
        if not seeds:
            seeds = [str(cfg.seed)]
    return cells, fixed_lines, seeds


def objective(run_dir: Path, split: str) -> tuple[str, float | None, str]:
    """(state, value, why) of a finished trial from its records; never reads another split."""
    info_path, metrics_path = run_dir / "run_info.json", run_dir / "metrics.json"
    if not info_path.is_file():
        return "FAIL", None, f"{run_dir} has no run_info.json (the job did not start)"
    info = json.loads(info_path.read_text())
    if info.get("status") != "completed":
        return "FAIL", None, f"run {info.get('status')}: {info.get('error') or ''}".strip()
    key = str(info.get("main_metric"))
    if key.partition("/")[0] != split:
        raise UserError(f"the trials' main metric is {key}, not on the selection split {split}/; the search must "
                        f"not read a held-out split: set the task's main_metric to a {split}/ key")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "FAIL", None, f"{key} is {value!r} in {metrics_path}"
    return "COMPLETE", float(value), key


def sampler_for(o: Options, number: int) -> Any:
    """A fresh sampler seeded by (seed, trial number): the same trial sequence on a rerun and after a resume
    (Optuna's samplers keep their RNG in the process). Every cell (arm) gets the same random draws of a
    shared dimension such as trainer.lr at the same trial number (common random numbers)."""
    seed = getattr(o.sampler, "keywords", {}).get("seed")
    return o.sampler(seed=None if seed is None else (int(seed) * 1_000_003 + number) % 2**32)


def overrides_of(cell: Cell, fixed: list[str], seed: str, params: dict[str, Any], subdir: str) -> list[str]:
    return [*cell.overrides, *fixed, f"seed={seed}", *(f"{k}={sp.format_value(v)}" for k, v in params.items()),
            f"hydra.sweep.subdir={sp.format_value(subdir)}"]


def ask_batch(o: Options, cells: list[Cell]) -> list[tuple[Cell, Any, str]]:
    """Up to n_jobs new trials, each from the cell with the fewest counted trials (ties: grid order)."""
    counts = {c.label: len(st.counted(c.study.get_trials(deepcopy=False))) for c in cells}
    batch = []
    while len(batch) < o.n_jobs:
        open_cells = [c for c in cells if counts[c.label] < o.n_trials]
        if not open_cells:
            break
        cell = min(open_cells, key=lambda c: counts[c.label])
        trial = cell.study.ask()
        # seeded by the trial's number, known only now (two workers may ask at once); Optuna samples lazily,
        # at the first suggestion, and a re-queued trial's fixed params win (what ask(distributions) does)
        cell.study.sampler = sampler_for(o, trial.number)
        for name, dist in cell.space.items():
            trial._suggest(name, dist)
        if not st.slot(cell.study, trial, o.n_trials):  # another worker took the last slot first
            trial.set_user_attr(st.SURPLUS, True)
            cell.study.tell(trial, state=_state("FAIL"))
            counts[cell.label] = o.n_trials
            continue
        subdir = trial.user_attrs.get(st.RUN_DIR) or f"trials/{cell.label}/{trial.number:03d}"
        for key, value in ((st.WORKER, st.worker_id()), (st.RUN_DIR, subdir), ("rft_cell", cell.label)):
            trial.set_user_attr(key, value)
        counts[cell.label] += 1
        batch.append((cell, trial, subdir))
    return batch


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def search(o: Options, cells: list[Cell], fixed: list[str], seeds: list[str], sweep_dir: Path, launch: Any) -> int:
    """Run batches until every cell has n_trials counted trials; returns the number of FAIL trials told."""
    failed = 0
    job_idx = 0
    while True:
        for cell in cells:
            st.recover_stale(cell.study, o.grace_s)
        batch = ask_batch(o, cells)
        if not batch:
            break
        jobs = [[*overrides_of(c, fixed, seeds[0], dict(t.params), d), *o.trial_overrides] for c, t, d in batch]
        log.info("optuna: trials %s", ", ".join(f"{c.label}#{t.number} {t.params}" for c, t, _ in batch))
        beat = st.Heartbeat(o.heartbeat_s)
        beat.trials = [t for _, t, _ in batch]
        with beat:
            try:
                launch(jobs, job_idx)
            except Exception as e:  # noqa: BLE001  a submitit job that exited 2 raises here; its records say so
                message = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                if not any((sweep_dir / d / "run_info.json").is_file() for _, _, d in batch):
                    requeue(batch)  # nothing ran: a launcher problem, not the trials' (they rerun on resume)
                    raise UserError(f"the launcher failed before any trial of the batch started ({message}); "
                                    "fix it and rerun the same command to resume") from None
                log.warning("optuna: the launcher reported %s", message)
                # submitit raises at the first failed job of a batch while the others may still run
                settle([sweep_dir / d for _, _, d in batch], o.grace_s)
        job_idx += len(jobs)
        for cell, trial, subdir in batch:
            state, value, why = objective(sweep_dir / subdir, o.objective_split)
            if state == "COMPLETE":
                trial.set_user_attr("rft_metric", why)
                cell.study.tell(trial, value)
            else:
                failed += 1
                trial.set_user_attr("rft_error", why[:500])
                cell.study.tell(trial, state=_state("FAIL"))
                log.warning("optuna: %s trial %d failed (%s); the search goes on", cell.label, trial.number, why)
    return failed


def settle(run_dirs: list[Path], quiet_s: float, poll_s: float = 5.0) -> None:
    """Wait while a run of the batch still says `running` and wrote a file in the last `quiet_s` seconds."""
    import time

    def busy(run: Path) -> bool:
        info = run / "run_info.json"
        if not info.is_file() or json.loads(info.read_text()).get("status") != "running":
            return False
        newest = max((f.stat().st_mtime for f in run.rglob("*") if f.is_file()), default=0.0)
        return time.time() - newest < quiet_s

    while any(busy(r) for r in run_dirs):
        time.sleep(poll_s)


def requeue(batch: list[tuple[Cell, Any, str]]) -> None:
    """Give a batch that never ran back to the queue: same parameters and run folders, not counted."""
    for cell, trial, subdir in batch:
        trial.set_user_attr(st.RETRIED, True)
        cell.study.tell(trial, state=_state("FAIL"))
        cell.study.enqueue_trial(dict(trial.params), user_attrs={st.RUN_DIR: subdir, "rft_retry_of": trial.number})


def final(o: Options, cells: list[Cell], fixed: list[str], seeds: list[str], storage: str, launch: Any) -> None:
    """The best trial of every cell, once per seed."""
    jobs = []
    for cell in cells:
        done = cell.study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))
        if not done:
            raise UserError(f"study {cell.study.study_name} has no completed trial; run the search first "
                            "(the same command without hydra.sweeper.stage=final)")
        n = len(st.counted(cell.study.get_trials(deepcopy=False)))
        if n < o.n_trials:
            log.warning("optuna: %s has %d of %d trials; its best so far is used", cell.label, n, o.n_trials)
        best = cell.study.best_trial
        record = {"storage": storage, "study": cell.study.study_name, "trial": best.number,
                  "value": best.value, "metric": best.user_attrs.get("rft_metric"), "n_trials": n}
        tuned = "tuned_from={" + ",".join(f"{k}:{sp.format_value(v)}" for k, v in record.items()) + "}"
        for seed in seeds:
            jobs.append([*overrides_of(cell, fixed, seed, dict(best.params), f"final/{cell.label}/seed={seed}"), tuned])
    log.info("optuna: %d final runs (%d cells x %d seeds)", len(jobs), len(cells), len(seeds))
    launch(jobs, 0)


def open_studies(o: Options, cells: list[Cell], sweep_dir: Path) -> str:
    import optuna

    storage, described = st.make_storage(o.storage, sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for cell in cells:
        cell.study = optuna.create_study(study_name=f"{o.study_name}/{cell.label}", storage=storage,
                                         direction=o.direction, load_if_exists=True, sampler=sampler_for(o, 0))
    log.info("optuna: %d studies in %s (%s), %d trials each", len(cells), described, o.stage, o.n_trials)
    return described


def to_options(kwargs: dict[str, Any]) -> Options:
    params, extra = kwargs.get("params"), kwargs.get("trial_overrides")
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else extra
    return Options(**{**kwargs, "params": dict(params or {}), "trial_overrides": [str(x) for x in extra or []]})
