"""Which config a run directory belongs to: the options a rerun or resume may change, and the differences
that make a rerun another experiment.

A run directory keeps the composed config of its first start in `run_config.yaml` (written by `RunDir`:
Hydra rewrites `.hydra/` at every start, so it cannot tell what the folder's results came from). A rerun
or resume in the same folder must compose the same config, except for the options below, which cannot
change what the run computes. Only omegaconf is imported.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# Options that may differ between the attempts of one run, each with the reason it cannot change the results.
IGNORED = {
    "data_dir": "where the same data files are read from (a changed carved dev split still fails its own check)",
    "resume": "how an attempt starts, not what it computes (resume=never starts the folder over anyway)",
    "tag": "a free-form label for grouping",
    "trainer.keep_checkpoints": "what checkpoints/ keeps once the run has been scored",
    "trainer.log_every": "how often a train row is logged; the loss, weights and metrics do not depend on it",
    "trainer.save_every": "when checkpoints/last is written; an exact resume continues alike from any of them",
    "trainer.save_checkpoints": "whether the best weights are kept on disk or in memory; the same weights",
    "trainer.interrupt_at_step": "a test hook that stops the run where a kill would; the rerun resumes it",
    "trainer.eval_batch_size": "memory only: evaluation pads each batch and masks the padding",
    "trainer.devices": "the process count; a resume with another count is allowed and warned about (loop.set_rng)",
}


def comparable(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config as flat dotted keys, without the IGNORED options."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(tree, "")
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(f"{i}.") for i in IGNORED)}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key whose value differs (absent on one side: `<unset>`), in key order."""
    def show(value: Any) -> str:
        text = "<unset>" if value is _UNSET else repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{k}: {show(old.get(k, _UNSET))} -> {show(new.get(k, _UNSET))}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, _UNSET) != new.get(k, _UNSET)]


_UNSET = object()


def mismatch_message(path: str, diffs: list[str], dir_key: str) -> str:
    """The one line for a rerun or resume whose config is not the run directory's."""
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return (f"run directory {path} holds a run of another config ({', '.join(diffs[:3])}{more}); set {dir_key} "
            "to another folder for this config, or add resume=never to start this folder over")
