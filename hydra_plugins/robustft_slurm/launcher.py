"""`hydra/launcher=slurm`'s class. Hydra instantiates launchers only from the `hydra_plugins` namespace, so the
class lives here; what it adds to hydra-submitit-launcher's SlurmLauncher is in robustft/slurm.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _PluginSlurmLauncher
except ImportError:  # without the `slurm` extra: hydra/launcher=slurm fails as "Unknown plugin class"
    _PluginSlurmLauncher = None

if _PluginSlurmLauncher is not None:

    class SlurmLauncher(_PluginSlurmLauncher):
        """The plugin's launcher (the compute-node side, `checkpoint` for submitit's USR2 requeue, unchanged);
        `launch` logs where to look, waits for every job and reports each failed one in one line."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
            from robustft import slurm

            return slurm.launch(self, job_overrides, initial_job_idx)
