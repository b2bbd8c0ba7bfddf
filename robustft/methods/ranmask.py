"""RanMASK (Zeng et al., "Certified Robustness to Text Adversarial Attacks by Randomized [MASK]", Computational
Linguistics 2023; zjiehang/RanMASK, `--training_type sparse`): train on inputs with a random share of their words
replaced by [MASK], predict with an ensemble over randomly masked copies.

    training: each example once, round(n * mask_rate) of its n maskable positions masked (>= min_keep kept)
    predict:  ensemble_size masked copies per input; votes: p = bincount(argmax of each copy) / ensemble_size,
              mean: the mean over copies of the l2-normalised logits (sklearn `normalize`, as the official)

`predict` returns log p for votes (p + 1e-12 for a class without votes), so the softmax the evaluators and
attacks take gives back p and its argmax is the majority vote, and the mean itself for mean (TextAttack, which
the official feeds, takes its softmax too); every evaluator and attack queries this ensemble, and each
query costs `ensemble_size` forwards (`ensemble/size` in metrics.json states it for every number of the run).

Defaults: the official `args.py` (sparse_mask_rate 0.7, predict_ensemble 100, ensemble_method votes) and
`utils/mask.py` (`min_keep` 2). Departures: positions are the tokenizer's sub-word tokens of the last text field
(the official masks whitespace words of the perturbable sentence), chosen on the device without host syncs;
the ensemble's masks come from a generator seeded with the run seed at every `predict` call, so the same batch
gets the same prediction (the official draws fresh masks at every call); the official's optional LM-guided
masking (`with_lm`) and sentiment-word keeping are not here. Classification only.
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, StepOutput, TrainContext, model_inputs, task_loss

ENSEMBLE_METHODS = ("votes", "mean")


def maskable(batch: dict[str, torch.Tensor], special_ids: torch.Tensor) -> torch.Tensor:
    """Real, non-special tokens of each row's last segment (token_type_ids == the row's largest type)."""
    ids = batch["input_ids"]
    ok = batch["attention_mask"].bool() & ~torch.isin(ids, special_ids.to(ids.device))
    types = batch.get("token_type_ids")
    if types is not None:
        ok &= types == types.max(dim=1, keepdim=True).values
    return ok


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


class RanMask(Method):
    """Random [MASK] in training, an ensemble over masked copies at prediction (see the module docstring)."""

    def __init__(self, name: str, mask_rate: float, min_keep: int, ensemble_size: int, ensemble_method: str,
                 predict_batch_size: int) -> None:
        super().__init__(name)
        if not 0 <= float(mask_rate) < 1:
            raise UserError(f"method.mask_rate={mask_rate} must be in [0, 1)")
        if int(ensemble_size) < 1 or int(min_keep) < 0 or int(predict_batch_size) < 1:
            raise UserError(f"method.ensemble_size={ensemble_size}, min_keep={min_keep}, predict_batch_size="
                            f"{predict_batch_size}: ensemble_size and predict_batch_size must be >= 1, min_keep >= 0")
        if ensemble_method not in ENSEMBLE_METHODS:
            raise UserError(f"method.ensemble_method={ensemble_method!r}: choose votes or mean")
        self.mask_rate, self.min_keep = float(mask_rate), int(min_keep)
        self.ensemble_size, self.ensemble_method = int(ensemble_size), ensemble_method
        self.predict_batch_size = int(predict_batch_size)
        self.mask_id = 0
        self.special_ids = torch.empty(0, dtype=torch.long)
        self.seed = 0

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if bool(ctx.task.is_regression):
            raise UserError(f"method={self.name} votes over classes; task={ctx.task.name} is a regression task")
        tok = ctx.tokenizer
        if tok is None or getattr(tok, "mask_token_id", None) is None:
            raise UserError(f"method={self.name} needs a tokenizer with a mask token; choose a BERT/RoBERTa-style model")
        self.mask_id, self.seed = int(tok.mask_token_id), int(ctx.seed)
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
        return super().setup(model, ctx)

    def masked(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """`batch` with its chosen positions replaced by [MASK]."""
        chosen = random_mask(maskable(batch, self.special_ids), self.mask_rate, self.min_keep, generator)
        return {**batch, "input_ids": batch["input_ids"].masked_fill(chosen, self.mask_id)}

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, self.masked(batch, None))  # the global RNG: restored on resume
        return StepOutput(task_loss(logits, batch["labels"], False), logits.detach())

    def copies(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`ensemble_size` masked copies of each row, copy-major per row: rows [i * n, (i + 1) * n) are row i's."""
        inputs = {k: v.repeat_interleave(self.ensemble_size, dim=0) for k, v in model_inputs(batch).items()}
        return self.masked(inputs, generator)

    def combine(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows * n, C) copy logits -> (rows, C) ensemble probabilities, as the official wrapper."""
        per = logits.float().view(rows, self.ensemble_size, -1)
        if self.ensemble_method == "votes":
            votes = torch.nn.functional.one_hot(per.argmax(-1), per.shape[-1]).sum(dim=1)
            return votes.double() / self.ensemble_size
        return torch.nn.functional.normalize(per, dim=-1).mean(dim=1).double()

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["input_ids"].device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        inputs = self.copies(batch, generator)
        total = inputs["input_ids"].shape[0]
        step = self.predict_batch_size * self.ensemble_size
        logits = torch.cat([model(**{k: v[s : s + step] for k, v in inputs.items()}).logits
                            for s in range(0, total, step)])
        combined = self.combine(logits, batch["input_ids"].shape[0])
        if self.ensemble_method == "votes":
            return torch.log(combined + 1e-12).float()
        return combined.float()  # the official hands these to TextAttack, which takes their softmax

    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """The ensemble size every evaluation and attack number of this run was measured with."""
        return {"ensemble/size": float(self.ensemble_size)}
