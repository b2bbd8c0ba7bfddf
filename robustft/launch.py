"""Starting one run across processes from the command line: how many processes, the run directory every
rank uses, and the logs of ranks > 0. Used by the CLI only (robustft/cli.py), which imports it at start-up,
so torch (robustft/distributed.py, the process group) is imported only inside the functions that need it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from robustft.config import CONF_DIR
from robustft.dist_env import env
from robustft.errors import UserError


def env_rank() -> int:
    """This process's rank in a data-parallel launch, else 0."""
    return env().rank


def processes() -> int:
    """The processes torchrun or a multi-task SLURM step started (1 without them)."""
    return env().world_size


def _hydra_quote(value: str) -> str:
    """`value` as a quoted Hydra override value (a path may hold characters the override grammar reads)."""
    return "'" + value.replace("'", "\\'") + "'"


def agree_on_run_dir(args: list[str]) -> list[str]:
    """Under torchrun: the overrides that make every rank use rank 0's run directory (returned, to append).

    Hydra resolves `hydra.run.dir` in each process, and its default holds `${now:...}`: two processes a
    second apart would make two directories. Rank 0 resolves it (the same composition as the pre-flight)
    and broadcasts it; every rank passes it as `hydra.run.dir`, and ranks > 0 set `hydra.output_subdir=null`
    so only rank 0 writes .hydra/ (a sweep under torchrun is refused before: robustft/cli.py main).
    """
    from robustft import distributed  # torch: only once a run across processes starts

    answer: tuple[str, str] | None = None
    if distributed.is_main():
        answer = _resolved_run_dir([a for a in args if not a.startswith("-")])
    kind, value = distributed.broadcast_object(answer)
    if kind == "error":
        raise UserError(value)
    extra = [f"hydra.run.dir={_hydra_quote(value)}"]
    return extra + (["hydra.output_subdir=null"] if not distributed.is_main() else [])


def _resolved_run_dir(overrides: list[str]) -> tuple[str, str]:
    """("dir", absolute hydra.run.dir) as this composition resolves it, or ("error", the one line)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            return "dir", str(Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).absolute())
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        return "error", (f"hydra.run.dir cannot be resolved before the run starts ({str(e).splitlines()[0]}); "
                         "under torchrun set it to a folder, e.g. hydra.run.dir=outputs/my_run")


def rank_logging(run_dir: Any, rank: int) -> None:
    """Rank r > 0 logs to <run>/logs/rank<r>.log, each line prefixed `[rank<r>]`; its console shows warnings
    and errors only (rank 0's log is the run's). Hydra's file handler (robustft.log) is dropped unused."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)
    root.addHandler(logging.FileHandler(run_dir.rank_log(rank)))
    prefixed = logging.Formatter(f"[rank{rank}][%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for handler in root.handlers:
        handler.setFormatter(prefixed)
