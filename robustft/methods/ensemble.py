"""Randomised-smoothing defences (RanMASK, SAFER): a randomised input in training, and a prediction that is the
vote (or mean) over `ensemble_size` randomised copies of each input, as zjiehang/RanMASK's ensemble wrappers
(`huggingface_model_mask_ensemble_wrapper.py`, `huggingface_model_safer_wrapper.py`, identical combination):

    votes: p = bincount(argmax of each copy's logits) / ensemble_size;  predict returns log(p + 1e-12)
    mean:  the mean over copies of the l2-normalised logits (sklearn `normalize`); predict returns it as is

so the softmax the evaluators and attacks take gives back p (TextAttack, which the official feeds, softmaxes the
mean too). Every evaluator and attack queries this ensemble; a query costs `ensemble_size` forwards, and
`ensemble/size` in metrics.json states the size every number of the run was measured with. The copies come
from a generator seeded with the run seed at every `predict` call, so a batch gets the same prediction each
time (the official draws fresh randomness per call).
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, StepOutput, TrainContext, model_inputs, task_loss

ENSEMBLE_METHODS = ("votes", "mean")


def last_segment(batch: dict[str, torch.Tensor], special_ids: torch.Tensor) -> torch.Tensor:
    """Real, non-special tokens of each row's last segment (token_type_ids == the row's largest type)."""
    ids = batch["input_ids"]
    ok = batch["attention_mask"].bool() & ~torch.isin(ids, special_ids.to(ids.device))
    types = batch.get("token_type_ids")
    if types is not None:
        ok &= types == types.max(dim=1, keepdim=True).values
    return ok


class RandomisedEnsemble(Method):
    """Base: subclasses define `randomise(batch, generator)` (one random copy of each row)."""

    def __init__(self, name: str, ensemble_size: int, ensemble_method: str, predict_batch_size: int) -> None:
        super().__init__(name)
        if int(ensemble_size) < 1 or int(predict_batch_size) < 1:
            raise UserError(f"method.ensemble_size={ensemble_size}, predict_batch_size={predict_batch_size}: "
                            f"both must be >= 1")
        if ensemble_method not in ENSEMBLE_METHODS:
            raise UserError(f"method.ensemble_method={ensemble_method!r}: choose votes or mean")
        self.ensemble_size, self.ensemble_method = int(ensemble_size), ensemble_method
        self.predict_batch_size = int(predict_batch_size)
        self.special_ids = torch.empty(0, dtype=torch.long)
        self.seed = 0

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if bool(ctx.task.is_regression):
            raise UserError(f"method={self.name} votes over classes; task={ctx.task.name} is a regression task")
        self.seed = int(ctx.seed)
        if ctx.tokenizer is not None:
            self.special_ids = torch.tensor(sorted(set(ctx.tokenizer.all_special_ids)), dtype=torch.long)
        return super().setup(model, ctx)

    def randomise(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, self.randomise(batch, None))  # the global RNG: restored on resume
        return StepOutput(task_loss(logits, batch["labels"], False), logits.detach())

    def copies(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`ensemble_size` random copies of each row, rows [i * n, (i + 1) * n) being row i's."""
        inputs = {k: v.repeat_interleave(self.ensemble_size, dim=0) for k, v in model_inputs(batch).items()}
        return self.randomise(inputs, generator)

    def combine(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows * n, C) copy logits -> (rows, C): vote shares, or the mean of the l2-normalised logits."""
        per = logits.float().view(rows, self.ensemble_size, -1)
        if self.ensemble_method == "votes":
            votes = torch.nn.functional.one_hot(per.argmax(-1), per.shape[-1]).sum(dim=1)
            return votes.double() / self.ensemble_size
        return torch.nn.functional.normalize(per, dim=-1).mean(dim=1).double()

    def copy_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows * n, C) logits of the seeded random copies, `predict_batch_size` inputs per forward."""
        device = batch["input_ids"].device
        inputs = self.copies(batch, torch.Generator(device=device).manual_seed(self.seed))
        step = self.predict_batch_size * self.ensemble_size
        return torch.cat([model(**{k: v[s : s + step] for k, v in inputs.items()}).logits
                          for s in range(0, inputs["input_ids"].shape[0], step)])

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        combined = self.combine(self.copy_logits(model, batch), batch["input_ids"].shape[0])
        if self.ensemble_method == "votes":
            return torch.log(combined + 1e-12).float()
        return combined.float()

    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """The ensemble size every evaluation and attack number of this run was measured with."""
        return {"ensemble/size": float(self.ensemble_size)}
