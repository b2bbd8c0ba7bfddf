"""`hydra/sweeper=optuna` (robustft/conf/hydra/sweeper/optuna.yaml): a Hydra 1.3 Sweeper on current Optuna.

Hydra only instantiates sweepers that live in the `hydra_plugins` namespace package, hence this thin class;
the search itself is robustft/tune/sweep.py. Written for Optuna >= 4 because Hydra's own
hydra-optuna-sweeper (1.3.0) requires optuna < 3; its override grammar is kept (robustft/tune/space.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger("robustft")


class OptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from robustft.tune.sweep import to_options

        self.options = to_options(kwargs)
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def compose(self, overrides: list[str]) -> DictConfig:
        """One job's config as the launcher will compose it (for the cell's method and its search space)."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def launch(self, jobs: list[list[str]], job_idx: int) -> Any:
        return self.launcher.launch([tuple(j) for j in jobs], initial_job_idx=job_idx)

    def sweep(self, arguments: list[str]) -> None:
        from robustft.errors import UserError
        from robustft.tune import sweep as tune

        assert self.config is not None
        o = self.options
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            tune.check_options(o)
            cells, fixed, seeds = tune.plan(o, arguments, self.compose)
            storage = tune.open_studies(o, cells, sweep_dir)
            if o.stage == "final":
                tune.final(o, cells, fixed, seeds, storage, self.launch)
                return
            failed = tune.search(o, cells, fixed, seeds, sweep_dir, self.launch)
        except UserError as e:
            print(f"robustft: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if failed:
            log.warning("optuna: %d trials failed (state FAIL in the study); the search completed", failed)
        # the basic launcher's failed jobs printed their line; a search with failed trials still succeeded
        cli = sys.modules.get("robustft.cli")
        if cli is not None:
            cli.FAILED_JOBS.clear()
