"""The evaluation protocol's splits (issue #26, docs/protocol.md): which split selects, which is held out.

`task.selection=carve` carves a selection split (`validation`) out of train with `task.split_seed`, and the
task's official dev set (SNLI: its official test) becomes the held-out `test`; `task.selection=dev` selects
on the official dev, as GLUE reports. `robustft.data.load_task` applies this between reading the files and
the sample caps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict
from omegaconf import DictConfig

from robustft.errors import UserError

SELECTION = ("dev", "carve")


def ids_sha256(ids: list[int]) -> str:
    """Hash of the comma-joined sorted ids: run_info.json keeps this, splits.json the list itself."""
    return hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()


@dataclass(frozen=True)
class DevCarve:
    """The selection split carved out of train: its seed and the sorted `idx` of all its examples (before
    max_eval_samples)."""

    split_seed: int
    ids: list[int]

    @property
    def sha256(self) -> str:
        return ids_sha256(self.ids)

    def summary(self) -> dict[str, Any]:
        return {"split_seed": self.split_seed, "n": len(self.ids), "sha256": self.sha256}

    def check(self, recorded: Mapping[str, Any] | None, where: str) -> None:
        """Fail if this carve is not the split a trained run recorded (the data or task.selection_size changed)."""
        if recorded is None or (recorded["n"], recorded["sha256"]) == (len(self.ids), self.sha256):
            return
        raise UserError(
            f"{where}: the selection split carved now (task.split_seed={self.split_seed}, {len(self.ids)} examples, "
            f"sha256 {self.sha256[:12]}) is not the one that run recorded ({recorded['n']} examples, sha256 "
            f"{recorded['sha256'][:12]}), so it may hold training examples; evaluate with the data and "
            "task.selection_size the model was trained with"
        )


def selection_mode(task: DictConfig) -> str:
    """task.selection: `dev` (the official dev set selects and is reported) or `carve` (a split of train selects)."""
    return str(task.get("selection") or "dev")


def held_out_split(task: DictConfig) -> str:
    """The split attacks score and reports read as held out: `test` when selection carves (the official dev,
    or the official test where the task has one, SNLI), else `validation` (the official dev, as GLUE reports)."""
    return "test" if selection_mode(task) == "carve" else "validation"


def official_source(task: DictConfig, split: str, local: bool) -> str | None:
    """Which official split (key of task.local / task.hub) becomes our `split`; None = carved out of train.

    With selection=carve, `test` is the official test where the task has one (SNLI), else the official dev.
    """
    if selection_mode(task) != "carve" or split == "train":
        return split
    if split == "validation":
        return None
    have = task.get("local") or {} if local else {k: v for k, v in (task.get("hub") or {}).items() if v}
    return "test" if "test" in have else "validation"


def carve_dev(train: Dataset, task: DictConfig) -> tuple[Dataset, Dataset, DevCarve]:
    """Split `task.selection_size` examples off train with `task.split_seed`, never the run seed.

    With the run seed, each seed of a sweep was selected on a different set, and a train=false evaluation
    without the training seed carved a "dev" set holding training examples.
    """
    if not task.get("selection_size"):
        raise UserError(f"task {task.name}: task.selection=carve needs task.selection_size (a count, or a fraction "
                        "of train); e.g. task.selection_size=0.1")
    if task.get("split_seed") is None:
        raise UserError(f"task {task.name} carves its selection split out of train but has no task.split_seed; "
                        "add split_seed: 42 beside selection_size in its task YAML")
    size = float(task.selection_size) if float(task.selection_size) < 1 else int(task.selection_size)
    if isinstance(size, int) and size >= len(train):
        raise UserError(f"task.selection_size={size} leaves no training data ({len(train)} training examples); "
                        "use a smaller count or a fraction such as task.selection_size=0.1")
    parts = train.train_test_split(test_size=size, seed=int(task.split_seed), shuffle=True)
    carve = DevCarve(int(task.split_seed), sorted(int(i) for i in parts["test"]["idx"]))
    return parts["train"], parts["test"], carve


def arrange_splits(ds: DatasetDict, task: DictConfig, local: bool) -> DevCarve | None:
    """Name the splits by role, in place: `validation` selects, `test` is held out (task.selection; see
    official_source). Returns the carve (None with selection=dev)."""
    if selection_mode(task) == "carve":
        official = {split: ds.pop(split) for split in ("validation", "test") if split in ds}
        source = official_source(task, "test", local)
        if source in official:
            ds["test"] = official[source]
        carved = None
        if "train" in ds:
            ds["train"], ds["validation"], carved = carve_dev(ds["train"], task)
        if "test" in ds:
            ds["test"] = ds.pop("test")  # after validation: the order of evaluation and of the records
        return carved
    if "validation" not in ds:
        raise UserError(f"task {task.name} has no official dev set {'in the local bundle' if local else 'here'}; "
                        "use task.selection=carve (a selection split carved out of train)")
    return None


def split_records(data: DatasetDict, task: DictConfig, local: bool) -> dict[str, dict[str, Any]]:
    """run_info.json `splits`: each split's role, where it comes from, size and sha256 of its sorted ids
    (train: the pool after max_train_samples, before a stress or a method's own selection)."""
    carve, out = selection_mode(task) == "carve", {}
    for split, ds in data.items():
        if split == "train":
            role, source = "train", "train"
        elif split == "validation":
            role = "selection"
            source = f"train, carved with split_seed {task.get('split_seed')}" if carve else "official dev"
        elif split == held_out_split(task):
            role, source = "held-out", f"official {'test' if official_source(task, split, local) == 'test' else 'dev'}"
        else:
            role, source = "held-out", "official test"
        out[split] = {"role": role, "source": source, "n": len(ds), "sha256": ids_sha256([int(i) for i in ds["idx"]])}
    return out
