"""`robustft` console script: Hydra app + a pre-flight that turns config mistakes into one-line errors."""

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
from robustft.config import group_options as _group_options
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


def _type_of_default(default: Any, value: Any) -> str | None:
    """Name of the expected type when `value` does not fit the default's type, else None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None


def _sweep_values(o) -> list[str] | None:
    """The values one parsed override takes (a sweep's several); None where only a sweeper can tell."""
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    if isinstance(o.value(), Glob):  # glob(...) picks group options, as Hydra's sweeper does
        key = o.get_key_element().lstrip("+~")
        found = o.value().filter(_group_options(key))
        if not found:
            fail(f"{o.input_line} matches no {key} option; choose from: {', '.join(_group_options(key))}")
        return found
    try:
        return [str(v) for v in o.sweep_string_iterator()]
    except HydraException:  # interval(...) etc.: only a sweeper plugin can enumerate it; leave it to Hydra
        return None


def _variants(user: list[str]) -> list[list[str]]:
    """One override list with every override's first value, plus one per other swept value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(user)
    except HydraException as e:
        fail(f"cannot parse overrides ({str(e).splitlines()[0]}); use key=value, e.g. task=rte trainer.epochs=3")
    parsed = [o for o in parsed if _sweep_values(o) is not None]
    choices = [_sweep_values(o) for o in parsed]
    keys = [o.get_key_element() for o in parsed]  # keeps the +/++/~ prefix: `+arm=x` stays `+arm=x`
    base = [f"{k}={vals[0]}" for k, vals in zip(keys, choices, strict=False)]
    return [base] + [base[:i] + [f"{keys[i]}={v}"] + base[i + 1 :] for i, vals in enumerate(choices) for v in vals[1:]]


def _check_group_choices(variant: list[str]) -> None:
    for item in variant:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ("model", "task", "method", "trainer", "robustness") or (CONF_DIR / key).is_dir():
            value = item.split("=", 1)[1].strip("[]")
            for choice in filter(None, (v.strip() for v in value.split(","))):
                if choice not in _group_options(key) and choice != "null":
                    options = ", ".join(_group_options(key))
                    fail(f"unknown {key} '{choice}'; choose one of: {options} (robustft --help lists every group)")


def _compose_checked(compose: Any, variant: list[str]) -> DictConfig:
    """Hydra's composition, its errors as one line."""
    from hydra.errors import HydraException, MissingConfigException

    try:
        return compose("config", overrides=variant)
    except MissingConfigException as e:
        fail(f"{str(e).splitlines()[0]}; robustft --help lists the config groups and options")
    except HydraException as e:
        msg = str(e).splitlines()[0]
        if "not in struct" in msg or "Could not override" in msg:
            key = msg.split("'")[1] if "'" in msg else msg
            fail(f"unknown option '{key}'; check the spelling (robustft --cfg job prints every option)")
        fail(f"{msg}; robustft --help shows the valid options")


def _check_values(cfg: DictConfig, variant: list[str], defaults: DictConfig, values: bool = True) -> None:
    """Method/selector options against their classes, each override's type, then robustft.validate.

    `values=False` (a sweep) leaves robustft.validate to each job (runner.fit runs it): a bad value then
    fails its own job with one line and the sweep's other jobs still run.
    """
    from robustft.methods.base import check_options
    from robustft.validate import validate

    try:  # the method/selector keys against their classes' options (imports them, builds nothing)
        check_options(cfg.get("method"), "method")
        check_options(cfg.get("selector"), "selector")
    except UserError as e:
        fail(str(e))
    for item in variant:
        key, _, _ = item.lstrip("+~").partition("=")
        default = OmegaConf.select(defaults, key, default=None)
        expected = _type_of_default(default, OmegaConf.select(cfg, key, default=None))
        if expected:
            fail(f"{key}={OmegaConf.select(cfg, key)!r} has the wrong type; it takes {expected}")
    if not values:
        return
    try:
        validate(cfg)
    except UserError as e:
        fail(str(e))


def preflight(overrides: list[str], multirun: bool | None = None) -> None:
    """Compose the config once per swept value so unknown options, groups, wrong types and (outside a
    sweep) bad values (robustft.validate) fail fast, then check that the run (or sweep) dir can be written.

    Method and selector options are checked against their classes' signatures too (`+method.foo=1`).

    Hydra's own messages are several lines long and arrive after a sweep has started; this gives one
    line with the fix, and no run directory is created. `multirun` None: whether the command line has -m.
    """
    from hydra import compose, initialize_config_dir

    if multirun is None:
        multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    variants = _variants([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        defaults = OmegaConf.create(OmegaConf.to_container(compose("config"), resolve=False))
        for variant in variants:
            _check_group_choices(variant)
            _check_values(_compose_checked(compose, variant), variant, defaults, values=not multirun)
        hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
        check_output_dir(variants[0] + hydra_overrides, multirun)


def check_output_dir(overrides: list[str], multirun: bool) -> None:
    """One line when hydra.run.dir (hydra.sweep.dir with -m) is under a file, not writable, or on a full disk."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from robustft import rundir

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        path = OmegaConf.select(compose("config", overrides=overrides, return_hydra_config=True), key)
    except (HydraException, OmegaConfBaseException, ValueError):
        return  # e.g. a dir built with ${hydra:...}: only a running Hydra can resolve it, and it will report
    try:
        rundir.check_output_dir(str(path), key)
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
    from robustft.errors import Interrupted, Signalled
    from robustft.launch import rank_logging
    from robustft.progress import bars_closed
    from robustft.rundir import RunDir, lifecycle, write_error
    from robustft.runner import fit

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
    if distributed.broadcast_object(run_dir.info.get("status") == "completed" and cfg.resume == "auto"):
        log.info("run in %s already completed; nothing to do", run_dir.path)
        if distributed.is_main():
            print_summary(run_dir, cfg)
        return None

    def on_term(signum: int, _frame: Any) -> None:
        raise Signalled(f"received signal {signum}")  # preemption / scancel: record it, keep checkpoints

    if "SUBMITIT_EXECUTOR" not in os.environ:  # under submitit, its own handlers checkpoint and requeue
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            signal.signal(signal.SIGTERM, on_term)
    log.info("run directory: %s", run_dir.path.resolve())
    if distributed.world_size() > 1:
        log.info("data-parallel: rank %d of %d (%s)", distributed.rank(), distributed.world_size(), distributed.backend())
    try:
        try:
            # run_info status: completed | failed | interrupted; a bar still drawn is stopped (cursor back)
            # before any message below
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
        fail(f"{e}; rerun the same command with {where} to resume", code=3)
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


def headline_rows(metrics: dict[str, Any], main_key: str | None, evaluators: list[str]) -> list[tuple[str, str, str]]:
    """(what, metrics.json key, n) of the main metric and each evaluator's headline metric.

    Headlines by what an evaluator reports, so a new evaluator needs no entry here: an attack's accuracy
    under attack, else a pooled `accuracy` (AdvGLUE), else every `<set>_accuracy` (OOD sets).
    """
    rows = []
    if main_key in metrics:
        split, _, name = main_key.partition("/")
        rows.append((f"clean {split} {name}" if split == "validation" else f"{split} {name}", main_key, ""))
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


def print_summary(run_dir: Any, cfg: DictConfig) -> None:
    """A small table after a run: the main metric, each evaluator's headline metric, and where the run is."""
    import json

    from rich.console import Console
    from rich.table import Table

    path = run_dir.path / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    section = cfg.get("robustness") or {}
    evaluators = [str(section[key].get("name", key)) for key in section]
    n_eval = run_dir.info.get("n_eval") or {}
    table = Table(title=f"summary: {cfg.task.name}, {cfg.method.name}, {cfg.model.name}, seed {cfg.seed}",
                  title_justify="left")
    for col, justify in (("metric", "left"), ("value", "right"), ("n", "right"), ("metrics.json key", "left")):
        table.add_column(col, justify=justify)
    for what, key, n_key in headline_rows(metrics, run_dir.info.get("main_metric"), evaluators):
        n = metrics.get(n_key) if n_key else n_eval.get(key.partition("/")[0])
        value = metrics[key]
        table.add_row(what, f"{value:.4f}" if isinstance(value, (int, float)) else str(value),
                      f"{int(n):,}" if isinstance(n, (int, float)) and n == n else "", key)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # a log file: no wrapped rows
    console.print(table)
    console.print(f"run directory: {run_dir.path.resolve()}", highlight=False, soft_wrap=True)


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
    if processes() > 1:  # torchrun: one run across the processes (README "Multi-GPU and multi-node")
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
    finally:
        if "robustft.distributed" in sys.modules:
            sys.modules["robustft.distributed"].destroy()
    if FAILED_JOBS:  # an in-process sweep ran on past them; each printed its line (and its run_info says failed)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
