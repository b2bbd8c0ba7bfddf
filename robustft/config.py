"""The packaged Hydra config: where it lives and how code outside the CLI composes from it.

At the bottom of the layers, so that the CLI, the runner (stage configs) and scripts compose the same
groups without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _compose(overrides: list[str]) -> DictConfig:
    """Compose `config` with overrides; inside a running Hydra app, through the app's own Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The job config as the CLI composes it, without the `hydra` node (for scripts, tests, stages)."""
    from omegaconf import open_dict

    cfg = _compose(list(overrides or []))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    OmegaConf.resolve(cfg)
    return cfg


def compose_group(group: str, option: str, what: str) -> dict[str, Any]:
    """One option of a config group (e.g. model=minilm) as composed by Hydra, unresolved.

    `what` names the setting that asked for it, for the one-line error on an unknown option.
    """
    if option not in group_options(group):
        raise UserError(f"{what}={option} is not a {group} config; choose one of: {', '.join(group_options(group))}")
    return OmegaConf.to_container(_compose([f"{group}={option}"])[group], resolve=False)
