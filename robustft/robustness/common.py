"""Helpers shared by the evaluators: resource paths, task checks, label names."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from robustft.errors import UserError


def resolve_resource(path: str, data_dir: Path | None, what: str, key: str = "") -> Path:
    """An absolute path as is, a relative one under data_dir; a missing file is a one-line UserError."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        if data_dir is None:
            raise UserError(f"{what} '{path}' is relative but no data_dir is set; set data_dir=/path/to/data "
                            f"(or ROBUSTFT_DATA_DIR){' or an absolute ' + key if key else ''}")
        p = data_dir / p
    if not p.exists():
        raise UserError(f"missing {what} {p}; put the file there (layout of shared/data/MANIFEST.md)"
                        f"{' or set ' + key + '=/path/to/it' if key else ''}")
    return p


def require_classification(task: DictConfig, evaluator: str) -> None:
    if bool(task.is_regression):
        raise UserError(f"{evaluator} needs a classification task, but {task.name} is regression; "
                        f"drop {evaluator} from robustness=[...] for this task")


def label_names(task: DictConfig) -> list[str]:
    return [str(n) for n in task.label_names]
