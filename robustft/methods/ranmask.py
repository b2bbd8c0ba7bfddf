"""RanMASK (Zeng et al., "Certified Robustness to Text Adversarial Attacks by Randomized [MASK]", Computational
Linguistics 2023; zjiehang/RanMASK, `--training_type sparse`): train on inputs with a random share of their words
replaced by [MASK], predict with an ensemble over randomly masked copies (robustft/methods/ensemble.py).

    each copy: round(n * mask_rate) of the n maskable positions masked, uniformly, at least min_keep kept

Defaults: the official `args.py` (sparse_mask_rate 0.7, predict_ensemble 100, ensemble_method votes) and
`utils/mask.py` (`min_keep` 2). Departures: positions are the tokenizer's sub-word tokens of the last text field
(the official masks whitespace words of the perturbable sentence), chosen on the device without host syncs;
the ensemble's masks are seeded per `predict` call (ensemble.py); the official's optional LM-guided masking
(`with_lm`) and sentiment-word keeping are not here. Classification only.
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import TrainContext
from robustft.methods.ensemble import RandomisedEnsemble, last_segment

maskable = last_segment  # the positions RanMASK may mask


def random_mask(ok: torch.Tensor, rate: float, min_keep: int, generator: torch.Generator | None) -> torch.Tensor:
    """For each row, exactly round(n * rate) of its n maskable positions (at least `min_keep` left), uniformly.

    The k smallest of i.i.d. uniform scores over the maskable positions: a uniform k-subset, as the official
    `np.random.choice(n, k, replace=False)`, with a per-row k and no host sync.
    """
    n = ok.sum(dim=1, keepdim=True)
    k = torch.round(n.double() * rate).long()
    k = torch.where(n - k < min_keep, (n - min_keep).clamp(min=0), k)
    scores = torch.rand(ok.shape, generator=generator, device=ok.device)
    scores = scores.masked_fill(~ok, 2.0)  # never chosen before a maskable position
    rank = scores.argsort(dim=1).argsort(dim=1)
    return ok & (rank < k)


class RanMask(RandomisedEnsemble):
    """Random [MASK] in training, an ensemble over masked copies at prediction (see the module docstring)."""

    def __init__(self, name: str, mask_rate: float, min_keep: int, ensemble_size: int, ensemble_method: str,
                 predict_batch_size: int) -> None:
        super().__init__(name, ensemble_size, ensemble_method, predict_batch_size)
        if not 0 <= float(mask_rate) < 1 or int(min_keep) < 0:
            raise UserError(f"method.mask_rate={mask_rate}, min_keep={min_keep}: mask_rate in [0, 1), min_keep >= 0")
        self.mask_rate, self.min_keep = float(mask_rate), int(min_keep)
        self.mask_id = 0

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        tok = ctx.tokenizer
        if tok is None or getattr(tok, "mask_token_id", None) is None:
            raise UserError(f"method={self.name} needs a tokenizer with a mask token; choose a BERT/RoBERTa-style model")
        self.mask_id = int(tok.mask_token_id)
        return super().setup(model, ctx)

    def randomise(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """`batch` with its chosen positions replaced by [MASK]."""
        chosen = random_mask(maskable(batch, self.special_ids), self.mask_rate, self.min_keep, generator)
        return {**batch, "input_ids": batch["input_ids"].masked_fill(chosen, self.mask_id)}

    masked = randomise
