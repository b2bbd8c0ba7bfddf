"""Shared by the weight mixup tests: the method as the runner builds it, a context, a batch, perturbed alphas."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robustft.methods.base import TrainContext
from robustft.methods.weight_mixup import BiLevelStage, WeightMixup
from tests.tiny_models import VOCAB

YAML = Path(__file__).resolve().parents[1] / "robustft" / "conf" / "method" / "weight_mixup.yaml"


def weight_mixup(**overrides) -> WeightMixup:
    """The method as the runner builds it: the YAML (the only place defaults live) with `overrides` merged in."""
    return instantiate(OmegaConf.merge(OmegaConf.load(YAML), overrides))






def ctx(seed: int = 0, log_every: int = 1, save_every: int = 1000) -> TrainContext:
    trainer = OmegaConf.create({"log_every": log_every, "save_every": save_every})
    return TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=trainer, device=torch.device("cpu"),
                        seed=seed)


def batch(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def perturb_alpha(method: WeightMixup | BiLevelStage, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in method.alphas():
            a.copy_(torch.rand(a.shape, generator=g, dtype=a.dtype) * 0.6 + 0.4)
