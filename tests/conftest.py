"""Shared fixtures: the real data bundle beside the repo, composed configs, a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from robustft.cli import compose_config

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("ROBUSTFT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def needs_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"data bundle not found at {DATA_DIR}")


def make_cfg(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """Compose the app config as the CLI would (hydra.* interpolations resolved away)."""
    return compose_config([f"data_dir={DATA_DIR}", *(overrides or [])])


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A tiny random BERT on a 64-example SST-2 slice: seconds per run, for loop/resume tests."""
    return [
        "model=tiny_random", "task=sst2", "task.max_train_samples=64", "task.max_eval_samples=32",
        "trainer.epochs=2", "trainer.batch_size=8", "trainer.eval_every=4", "trainer.log_every=2",
        "trainer.save_every=3", "trainer.precision=fp32", "trainer.max_length=32",
    ]
