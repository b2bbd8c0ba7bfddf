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

from robustft.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"
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


def fail(message: str, code: int = 2) -> None:
    print(f"robustft: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _type_of_default(default: Any, value: Any) -> str | None:
    """Name of the expected type when `value` does not fit the default's type, else None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None


def preflight(overrides: list[str]) -> None:
    """Compose the config once per swept value so unknown options, groups and wrong types fail fast.

    Method and selector options are checked against their classes' signatures too (`+method.foo=1`).

    Hydra's own messages are several lines long and arrive after a sweep has started; this gives one
    line with the fix, and no run directory is created.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException, MissingConfigException

    from robustft.methods.base import check_options

    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(user)
    except HydraException as e:
        fail(f"cannot parse overrides ({str(e).splitlines()[0]}); use key=value, e.g. task=rte trainer.epochs=3")

    def values(o) -> list[str] | None:
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

    # One composition with every override's first value, plus one per other swept value.
    parsed = [o for o in parsed if values(o) is not None]
    choices = [values(o) for o in parsed]
    keys = [("+" if o.is_add() else "") + o.get_key_element() for o in parsed]
    base = [f"{k}={vals[0]}" for k, vals in zip(keys, choices, strict=False)]
    variants = [base] + [base[:i] + [f"{keys[i]}={v}"] + base[i + 1 :] for i, vals in enumerate(choices) for v in vals[1:]]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        defaults = OmegaConf.to_container(compose("config"), resolve=False)
        for variant in variants:
            for item in variant:
                key = item.split("=", 1)[0].lstrip("+~")
                if key in ("model", "task", "method", "trainer", "robustness") or (CONF_DIR / key).is_dir():
                    value = item.split("=", 1)[1].strip("[]")
                    for choice in filter(None, (v.strip() for v in value.split(","))):
                        if choice not in _group_options(key) and choice != "null":
                            options = ", ".join(_group_options(key))
                            fail(f"unknown {key} '{choice}'; choose one of: {options} (robustft --help lists every group)")
            try:
                cfg = compose("config", overrides=variant)
            except MissingConfigException as e:
                fail(f"{str(e).splitlines()[0]}; robustft --help lists the config groups and options")
            except HydraException as e:
                msg = str(e).splitlines()[0]
                if "not in struct" in msg or "Could not override" in msg:
                    key = msg.split("'")[1] if "'" in msg else msg
                    fail(f"unknown option '{key}'; check the spelling (robustft --cfg job prints every option)")
                fail(f"{msg}; robustft --help shows the valid options")
            try:  # the method/selector keys against their classes' options (imports them, builds nothing)
                check_options(cfg.get("method"), "method")
                check_options(cfg.get("selector"), "selector")
            except UserError as e:
                fail(str(e))
            for item in variant:
                key, _, _ = item.lstrip("+~").partition("=")
                default = OmegaConf.select(OmegaConf.create(defaults), key, default=None)
                expected = _type_of_default(default, OmegaConf.select(cfg, key, default=None))
                if expected:
                    fail(f"{key}={OmegaConf.select(cfg, key)!r} has the wrong type; it takes {expected}")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The job config as the CLI composes it, without the `hydra` node (for scripts, tests, references)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    OmegaConf.resolve(cfg)
    return cfg


def run(cfg: DictConfig) -> dict[str, float] | None:
    """One job: owns the run directory's status from start to finish."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from robustft.errors import Interrupted
    from robustft.rundir import RunDir
    from robustft.runner import fit

    run_dir = RunDir(HydraConfig.get().runtime.output_dir)
    if run_dir.info.get("status") == "completed" and cfg.resume == "auto":
        log.info("run in %s already completed; nothing to do", run_dir.path)
        return None
    def on_term(signum: int, _frame: Any) -> None:
        raise Interrupted(f"received signal {signum}")  # preemption / scancel: record it, keep checkpoints

    if "SUBMITIT_EXECUTOR" not in os.environ:  # under submitit, its own handlers checkpoint and requeue
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            signal.signal(signal.SIGTERM, on_term)
    run_dir.start(
        seed=int(cfg.seed), task=cfg.task.name, method=cfg.method.name, model=cfg.model.name, tag=cfg.get("tag"),
        wall_time_s_before=run_dir.info.get("wall_time_s", 0.0),
    )
    try:
        metrics = fit(cfg, run_dir)
    except UserError as e:
        run_dir.finish("failed", str(e))
        fail(str(e))
    except Interrupted as e:
        run_dir.finish("interrupted", str(e))
        hydra_cfg = HydraConfig.get()  # a sweep ignores hydra.run.dir: its job dirs live under hydra.sweep.dir
        where = (f"hydra.sweep.dir={Path(hydra_cfg.sweep.dir).resolve()}" if hydra_cfg.mode == RunMode.MULTIRUN
                 else f"hydra.run.dir={run_dir.path}")
        fail(f"{e}; rerun the same command with {where} to resume", code=3)
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or submitit's handler exiting before a SLURM requeue
        run_dir.finish("interrupted", f"{type(e).__name__}: {e}")
        raise
    except BaseException as e:
        run_dir.finish("failed", f"{type(e).__name__}: {e}")
        raise
    run_dir.finish("completed")
    main_key = run_dir.info.get("main_metric")
    if main_key in metrics:
        log.info("done: %s = %.4f  (%s)", main_key, metrics[main_key], run_dir.path)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> Any:
    quiet_libraries()  # again here: submitit jobs (SLURM, submitit_local) unpickle this function, not main()
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
    if not any(a.split("=", 1)[0] in skip or a.startswith("--cfg") for a in args):
        preflight([a for a in args if not a.startswith("-")])
    quiet_libraries()
    _hydra_main()


if __name__ == "__main__":
    main()
