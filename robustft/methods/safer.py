"""SAFER (Ye et al., "SAFER: A Structure-free Approach for Certified Robustness to Adversarial Word
Substitutions", ACL 2020; as run in zjiehang/RanMASK `trainer/safer.py` and its SAFER ensemble wrapper): train on
inputs whose words are each replaced by a uniform draw from the word's perturbation set, predict with an
ensemble over such randomised copies (robustft/methods/ensemble.py: votes or mean).

    each copy: every position whose word has a perturbation set takes a uniform draw from {word} + its neighbours

The official `WordSubstitude.sample_from_table` draws uniformly from the word's `set` (which holds the word
itself) for every whitespace word of the lower-cased perturbable sentence; training uses one copy per example,
prediction `predict_ensemble` (100) copies, combined by `ensemble_method` (votes).

Departures: the perturbation sets are the counter-fitted neighbour lists robustft ships (the official builds
its sets from PCA'd GloVe neighbours, `perturbation_constraint_pca0.8_100.pkl`, not available offline), with
the word itself added; substitution happens on token ids, so only words that are one WordPiece token (not
followed by a `##` piece) whose neighbours are one token too are substituted (a tokenizer without `##` pieces
is an error); only the last text field is randomised (as the official's perturbable sentence).
"""

from __future__ import annotations

import torch
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import TrainContext
from robustft.methods.ensemble import RandomisedEnsemble, last_segment
from robustft.robustness.attack.transformations import load_table
from robustft.robustness.common import resolve_resource


def substitution_table(tokenizer, table: dict[str, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sets, sizes): sets[v, :sizes[v]] = token v and its one-token neighbours; size 1 = v is never replaced."""
    vocab = tokenizer.get_vocab()
    rows: dict[int, list[int]] = {}
    for word, neighbours in table.items():
        if word not in vocab:
            continue
        subs = [vocab[n] for n in neighbours if n in vocab and n != word]
        if subs:
            rows[vocab[word]] = [vocab[word], *subs]
    size = max(vocab.values()) + 1
    width = max((len(r) for r in rows.values()), default=1)
    sets = torch.arange(size).unsqueeze(1).repeat(1, width)
    sizes = torch.ones(size, dtype=torch.long)
    for v, r in rows.items():
        sets[v, : len(r)] = torch.tensor(r)
        sizes[v] = len(r)
    return sets, sizes


def wordpiece_table(ctx: TrainContext, path: str, name: str) -> dict[str, list[str]]:
    """The neighbour lists at `path`, once the tokenizer is known to have `##` pieces (whole-word substitution)."""
    tok = ctx.tokenizer
    vocab = tok.get_vocab() if tok is not None else {}
    if not any(t.startswith("##") for t in vocab):
        raise UserError(f"method={name} substitutes whole WordPiece tokens; model={getattr(tok, 'name_or_path', '?')} "
                        f"has no '##' pieces: choose a BERT-style model (minilm, bert_base)")
    return load_table(str(resolve_resource(path, ctx.data_dir, "word-substitution table", "method.path")))


def continuation_ids(tokenizer, size: int) -> torch.Tensor:
    """(size,) bool: which token ids are `##` continuation pieces."""
    continuation = torch.zeros(size, dtype=torch.bool)
    continuation[[i for t, i in tokenizer.get_vocab().items() if t.startswith("##")]] = True
    return continuation


def wordpiece_sets(ctx: TrainContext, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sets, sizes, continuation) from the neighbour lists at `path` (SAFER's and ASCC's substitution sets)."""
    sets, sizes = substitution_table(ctx.tokenizer, wordpiece_table(ctx, path, name))
    return sets, sizes, continuation_ids(ctx.tokenizer, len(sizes))


def substitutable(batch: dict[str, torch.Tensor], sizes: torch.Tensor, continuation: torch.Tensor,
                  special_ids: torch.Tensor) -> torch.Tensor:
    """Last-segment tokens with a substitution set that are a whole word (the next token is no `##` piece)."""
    ids = batch["input_ids"]
    nxt = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    return last_segment(batch, special_ids) & (sizes.to(ids.device)[ids] > 1) & ~continuation.to(ids.device)[nxt]


def neighbour_slots(batch: dict[str, torch.Tensor], sets: torch.Tensor, sizes: torch.Tensor,
                    continuation: torch.Tensor, special_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, S) substitute ids of every position (slot 0 = the token itself) and which slots are in its set: all of
    a `substitutable` token's set, slot 0 alone elsewhere (ASCC's and DNE's convex hulls)."""
    ids = batch["input_ids"]
    sets, sizes = sets.to(ids.device), sizes.to(ids.device)
    syn = sets[ids]
    valid = torch.arange(syn.shape[-1], device=ids.device) < sizes[ids].unsqueeze(-1)
    valid &= substitutable(batch, sizes, continuation, special_ids).unsqueeze(-1)
    valid[..., 0] = True
    return syn, valid


class Safer(RandomisedEnsemble):
    """Random word substitution in training, an ensemble over substituted copies at prediction."""

    def __init__(self, name: str, path: str, ensemble_size: int, ensemble_method: str,
                 predict_batch_size: int) -> None:
        super().__init__(name, ensemble_size, ensemble_method, predict_batch_size)
        self.path = path
        self.sets = torch.zeros(0, 1, dtype=torch.long)
        self.sizes = torch.zeros(0, dtype=torch.long)
        self.continuation = torch.zeros(0, dtype=torch.bool)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.sets, self.sizes, self.continuation = wordpiece_sets(ctx, self.path, self.name)
        return super().setup(model, ctx)

    def substitutable(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return substitutable(batch, self.sizes, self.continuation, self.special_ids)

    def randomise(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Each substitutable token replaced by a uniform draw from its set (itself included)."""
        ids = batch["input_ids"]
        sets, sizes = self.sets.to(ids.device), self.sizes.to(ids.device)
        pick = (torch.rand(ids.shape, generator=generator, device=ids.device) * sizes[ids]).long()
        drawn = sets[ids, pick.clamp(max=sets.shape[1] - 1)]
        return {**batch, "input_ids": torch.where(self.substitutable(batch), drawn, ids)}
