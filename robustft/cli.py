"""`robustft` console script: the Hydra app, the pre-flight's (robustft/preflight.py) one-line errors, and one
job's run from its run directory's status to the summary table."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from robustft.config import CONF_DIR, compose_config  # noqa: F401  (compose_config: for scripts and tests)
from robustft.errors import UserError
from robustft.launch import env_rank, processes

log = logging.getLogger("robustft")


def _sweep_subdir(overrides: str, seed: Any) -> str:
    """Sweep job folder: `<overrides>/seed=<seed>` so the seeds of one configuration sit together.

    A folder name holds at most 255 bytes: a longer override list keeps its first 200 bytes plus a hash of
    all of it (the full list is in each run's .hydra/overrides.yaml).
    """
    name = overrides or "default"
    if len(name.encode()) > 255:
        name = name.encode()[:200].decode(errors="ignore") + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name}/seed={seed}"


if not OmegaConf.has_resolver("rft_subdir"):
    OmegaConf.register_new_resolver("rft_subdir", _sweep_subdir)


# One-line errors of the jobs of an in-process sweep (basic launcher) that failed while the others ran on.
FAILED_JOBS: list[str] = []


def fail(message: str, code: int = 2) -> None:
    """The one line on stderr (rank 0 of a data-parallel run; the others log it in logs/rank<r>.log), exit."""
    if env_rank() > 0:
        if logging.getLogger().handlers:  # its rank log (before Hydra's logging: rank 0's line is the one)
            log.error("robustft: error: %s", message)
    else:
        print(f"robustft: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def preflight(overrides: list[str], multirun: bool | None = None) -> None:
    """robustft.preflight's checks of the command line, a failure as the one `robustft: error:` line and exit 2,
    before any run directory exists. `multirun` None: whether the command line has -m."""
    from robustft import preflight as checks

    if multirun is None:
        multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    try:
        checks.check(overrides, multirun)
    except UserError as e:
        fail(str(e))


def run(cfg: DictConfig) -> dict[str, float] | None:
    """One job: the run directory's status from start to finish (`rundir.lifecycle`), errors as one line.

    In a data-parallel run every rank gets here (from main(), or from submitit in a multi-task SLURM
    job): they join the process group, rank 0 writes the run directory, the others their own logs.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from robustft import distributed
    from robustft.launch import rank_logging
    from robustft.rundir import RunDir, write_error

    distributed.init()
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN  # a sweep ignores hydra.run.dir: its jobs live under hydra.sweep.dir
    dir_key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    try:
        run_dir = RunDir(hydra_cfg.runtime.output_dir)
        if not distributed.is_main():
            rank_logging(run_dir, distributed.rank())
    except OSError as e:
        if write_error(e, dir_key) is None:
            raise
        return job_failed(write_error(e, dir_key), None)  # no run_info to record it in
    with contextlib.ExitStack() as held:
        problem = None
        if distributed.is_main():  # rank 0 holds the folder for the whole data-parallel run
            try:
                held.enter_context(run_dir.hold(dir_key))
                run_dir.claim_config(cfg, start_over=cfg.resume == "never", dir_key=dir_key)
            except UserError as e:
                problem = str(e)
            except OSError as e:  # run_config.yaml on a full disk
                problem = write_error(e, dir_key, run_dir.path)
                if problem is None:
                    raise
        problem = distributed.broadcast_object(problem)
        if problem is not None:  # another run's folder (or in use): its run_info is left as it is
            return job_failed(problem, None)
        return run_job(cfg, run_dir, sweep, dir_key)


def run_job(cfg: DictConfig, run_dir: Any, sweep: bool, dir_key: str) -> dict[str, float] | None:
    """One job in its run directory (held by this run, of this config): skip a completed one, else `fit`."""
    from hydra.core.hydra_config import HydraConfig

    from robustft import distributed, threads
    from robustft.errors import Interrupted, Signalled
    from robustft.loggers.base import run_meta
    from robustft.progress import bars_closed
    from robustft.rundir import lifecycle, write_error
    from robustft.runner import fit

    hydra_cfg = HydraConfig.get()
    if distributed.broadcast_object(run_dir.info.get("status") == "completed" and cfg.resume == "auto"):
        log.info("run in %s already completed; nothing to do", run_dir.path)
        if distributed.is_main():
            print_summary(run_dir, cfg)
        return None
    catch_sigterm()
    log.info("run directory: %s", run_dir.path.resolve())
    threads.configure(cfg.trainer.get("threads", "auto"))  # once, before any torch work of the run
    if distributed.world_size() > 1:
        log.info("data-parallel: rank %d of %d (%s)", distributed.rank(), distributed.world_size(), distributed.backend())
    try:
        try:
            # run_info status: completed | failed | interrupted; a bar still drawn is stopped (cursor back)
            # before any message below
            run_dir.attach_trackers(cfg, run_meta(cfg, run_dir.path, hydra_cfg))  # logger=[...], rank 0
            with bars_closed(), lifecycle(run_dir, cfg):
                metrics = fit(cfg, run_dir)
        except Signalled:
            # every rank got the signal: exit at once. Waiting for the peers could deadlock with a rank blocked
            # in a collective that waits for this one, until torchrun's kill (status left `running`)
            raise
        except BaseException:
            distributed.settle()  # rank 0 has recorded the failure before any rank's exit stops the job
            raise
    except UserError as e:
        return job_failed(str(e), run_dir)
    except Interrupted as e:
        where = f"hydra.sweep.dir={Path(hydra_cfg.sweep.dir).resolve()}" if sweep else f"hydra.run.dir={run_dir.path}"
        # Ctrl-C exits 130 as shells expect (128 + SIGINT); SIGTERM and trainer.interrupt_at_step exit 3
        code = 130 if isinstance(e, Signalled) and e.signum == signal.SIGINT else 3
        fail(f"{e}; rerun the same command with {where} to resume", code=code)
    except OSError as e:  # a full disk or a folder turned read-only mid-run: name the path, not a traceback
        message = write_error(e, dir_key, run_dir.path)
        if message is None:
            raise
        return job_failed(message, run_dir)
    main_key = run_dir.info.get("main_metric")
    if main_key in metrics:
        log.info("done: %s = %.4f  (%s)", main_key, metrics[main_key], run_dir.path)
    if distributed.is_main():
        print_summary(run_dir, cfg)
    return metrics


def catch_sigterm() -> None:
    """SIGTERM (scancel, `scontrol requeue`, preemption, torchrun passing it on) and SIGINT (Ctrl-C) raise
    `Signalled` wherever the run is: it records `interrupted` with the attempt's wall time, keeps its
    checkpoints (the next attempt resumes from checkpoints/last) and the process exits at once, on every
    rank. Under submitit too: submitit 1.5 sets SIGTERM to "bypass" (it acts only on USR2, near the time
    limit, by checkpointing the submission and requeueing; that handler stays), so a cancelled, requeued or
    preempted job used to train on until Slurm's SIGKILL and leave run_info `running` (issue #28)."""
    from robustft.errors import Signalled

    def on_signal(signum: int, _frame: Any) -> None:
        Signalled.pending = signum
        raise Signalled(signum)

    Signalled.pending = None  # this run's own signal only (tests run several in one process)
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


def job_failed(message: str, run_dir: Any) -> None:
    """Record a job's UserError and print its one line; exit 2, except in an in-process sweep.

    Hydra's basic launcher runs a sweep's jobs one after another in this process: a SystemExit would end
    the whole sweep, and any other exception becomes a traceback once the sweep ends. So there the job
    returns, its run_info says `failed`, the other jobs run, and main() exits 2 at the end.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if run_dir is not None:
        with contextlib.suppress(OSError):  # a full disk may refuse this write too
            run_dir.finish("failed", message)
    hydra_cfg = HydraConfig.get()
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    if hydra_cfg.mode == RunMode.MULTIRUN and launcher.endswith(".BasicLauncher"):
        print(f"robustft: error: {message}", file=sys.stderr)
        FAILED_JOBS.append(message)
        return None
    fail(message)


def headline_rows(metrics: dict[str, Any], main_key: str | None, evaluators: list[str],
                  held_out: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(what, metrics.json key, n) of the main metric and each evaluator's headline metric.

    `held_out`: the held-out split's main metric (run_info `held_out_metric`), shown below the selection
    split's. Headlines by what an evaluator reports, so a new evaluator needs no entry here: an attack's accuracy
    under attack, else a pooled `accuracy` (AdvGLUE), else every `<set>_accuracy` (OOD sets).
    """
    rows = []
    if main_key in metrics:
        split, _, name = main_key.partition("/")
        rows.append((f"clean {split} {name}" if split == "validation" else f"{split} {name}", main_key, ""))
    rows += [(f"clean {k.partition('/')[0]} {k.partition('/')[2]}", k, "") for k in held_out
             if k in metrics and k != main_key]  # selection=dev: the held-out split is the selection split
    for ev in evaluators:
        keys = [k for k in metrics if k.startswith(f"{ev}/")]
        if f"{ev}/acc_under_attack" in metrics:  # its clean accuracy too: the attacked examples are a sample
            rows += [(f"{ev}: clean accuracy", f"{ev}/clean_acc", f"{ev}/n")] if f"{ev}/clean_acc" in metrics else []
            rows.append((f"{ev}: accuracy under attack", f"{ev}/acc_under_attack", f"{ev}/n"))
        elif f"{ev}/accuracy" in metrics:
            rows.append((f"{ev} accuracy", f"{ev}/accuracy", f"{ev}/n"))
        else:
            rows += [(f"{ev} {k[len(ev) + 1:-9]} accuracy", k, k[:-9] + "_n") for k in sorted(keys) if k.endswith("_accuracy")]
    return rows


def split_role(split: str, info: dict[str, Any]) -> str:
    """' (selection: ...)' / ' (held out: ...)' after a clean row, from run_info `splits`: which split picked the
    checkpoint, and whether that is the number reported (task.selection=dev)."""
    record = (info.get("splits") or {}).get(split)
    if not record:
        return ""
    if record.get("role") == "selection":
        return f" (selection: {record['source']})"
    return f" (held out: {record['source']})"


def print_summary(run_dir: Any, cfg: DictConfig) -> None:
    """A small table after a run: the main metric, each evaluator's headline metric, and where the run is."""
    import json

    from rich.console import Console
    from rich.table import Table

    from robustft.robustness.base import selected

    path = run_dir.path / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    section = cfg.get("robustness") or {}
    evaluators = [str(section[key].get("name", key)) for key in selected(section)]
    n_eval = run_dir.info.get("n_eval") or {}
    table = Table(title=f"summary: {cfg.task.name}, {cfg.method.name}, {cfg.model.name}, seed {cfg.seed}",
                  title_justify="left")
    for col, justify in (("metric", "left"), ("value", "right"), ("n", "right"), ("metrics.json key", "left")):
        table.add_column(col, justify=justify)
    info = run_dir.info
    held_out = (info["held_out_metric"],) if info.get("held_out_metric") else ()
    for what, key, n_key in headline_rows(metrics, info.get("main_metric"), evaluators, held_out):
        what += split_role(key.partition("/")[0], info) if not n_key else ""
        n = metrics.get(n_key) if n_key else n_eval.get(key.partition("/")[0])
        value = metrics[key]
        table.add_row(what, f"{value:.4f}" if isinstance(value, (int, float)) else str(value),
                      f"{int(n):,}" if isinstance(n, (int, float)) and n == n else "", key)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # a log file: no wrapped rows
    console.print(table)
    console.print(f"run directory: {run_dir.path.resolve()}", highlight=False, soft_wrap=True, markup=False)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> Any:
    # Here, not in main(): submitit jobs (SLURM, submitit_local) unpickle this function, and --help and the
    # pre-flight never get here, so they answer without importing torch/transformers/datasets.
    quiet_libraries()
    return run(cfg)


def quiet_libraries() -> None:
    """Library progress bars and load reports would drown the training log (and SLURM logs)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:]
    # The pre-flight knows only the packaged config: skip it for info commands and for another config
    # dir/path/name (whose values are not overrides and whose groups it cannot see).
    skip = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion",
            "-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name", "--experimental-rerun")
    info_only = any(a.split("=", 1)[0] in skip or a.startswith("--cfg") for a in args)
    if processes() > 1 and any(a in ("-m", "--multirun") for a in args):
        # a sweep's jobs would have to stay in lockstep on every rank through Hydra's launcher (a job failing
        # on one rank alone would stall the others): one torchrun per job, or a SLURM sweep of DDP jobs
        fail(f"-m (a sweep) cannot run under torchrun ({processes()} processes); start one torchrun per job, or "
             "sweep with hydra/launcher=slurm hydra.launcher.tasks_per_node=N (each job data-parallel)")
    if not info_only:
        preflight([a for a in args if not a.startswith("-")])
    if processes() > 1:  # torchrun: one run across the processes (docs/multi_gpu.md)
        from robustft import distributed
        from robustft.launch import agree_on_run_dir

        distributed.init()
        if distributed.world_size() > 1 and not info_only:
            try:
                extra = agree_on_run_dir(args)
            except UserError as e:
                fail(str(e))
            sys.argv = [sys.argv[0], *(a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))),
                        *extra]
    FAILED_JOBS.clear()
    try:
        _hydra_main()
    except ValueError as e:  # Hydra's own check of its mode flags (-m with --cfg, ...), raised before any run
        if not str(e).startswith("Only one of"):
            raise
        fail(f"{e}; drop the others (print a run's config without -m: robustft ... --cfg job)")
    finally:
        if "robustft.distributed" in sys.modules:
            sys.modules["robustft.distributed"].destroy()
    if FAILED_JOBS:  # an in-process sweep ran on past them; each printed its line (and its run_info says failed)
        raise SystemExit(2)
    if getattr(sys.modules.get("robustft.slurm"), "FAILED_JOBS", None):  # a SLURM sweep's, likewise
        raise SystemExit(2)


if __name__ == "__main__":
    main()
