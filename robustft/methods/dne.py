"""DNE (Zhou, Zheng, Hsieh, Chang, Huang, "Defense against Synonym Substitution-based Adversarial Attacks via
Dirichlet Neighborhood Ensemble", ACL 2021), as run in RockyLzy/TextDefender (`trainer/dne.py`,
`utils/dne_utils.py` `DecayAlphaHull` + `WeightedEmbedding`, the dne case of `HuggingFaceModelEnsembleWrapper`).

Every word embedding is replaced by a virtual one, a convex combination of the embeddings of the word's
neighbourhood S = {word} + its neighbours + their neighbours (at most `nbr_num` with the word):

    c ~ Dirichlet(dir_alpha for the word and its 1-hop neighbours, dir_alpha * dir_decay for the 2-hop ones)
    z_0 = log(c + 1e-6) - max;   e_k = sum_j softmax(z_k)_j E[s_j];   L_k = CE(f(e_k), y)
    z_{k+1} = z_k + adv_step_size * g_k / (||g_k|| + 1e-6) - max,   g_k = dL_k/dz_k   (per position, over S)
    parameter gradient = sum_{k=0..K} grad L_k,   K = adv_steps

so the model trains on a random point of each hull and on K points pushed towards higher loss, the K + 1 losses
summed (the official calls `loss.backward()` on each and steps once; its reported loss is their sum).
Prediction (validation, evaluators and attacks alike) is an ensemble over `ensemble_size` random points
(Dirichlet draws, no ascent) of every input, combined as ranmask/safer (robustft/methods/ensemble.py).

Defaults: TextDefender's `trainer/dne.py` (`--dir_alpha 1.0`, `--dir_decay 0.5`, `--nbr_num 50`, `--adv_iteration 3`
= adv_steps, `--adv_steps 10.0` = adv_step_size: the official's "adv_steps" is the step size) and the ensemble
wrapper's dne setting (12 copies, `args.ensemble_method` 'logits' = mean of l2-normalised logits).

Departures:
- Neighbour sets: the counter-fitted lists robustft ships (Jia et al. 2019, at most 8 neighbours a word). The
  official's `nbr_file` is not in its repository; the default commented out in `trainer/dne.py`,
  `euc-top8-d0.7.json`, names by its file name 8 nearest neighbours within Euclidean distance 0.7, the same kind
  of list with a bound we cannot check. Substitution acts on whole WordPiece tokens with
  one-token neighbours, in the last text field (SAFER's and ASCC's sets, robustft/methods/safer.py); the official
  treats every BERT token that has neighbours, the first sentence of a pair and word-initial pieces included.
- Set order and weights: the official `CachedWordSearcher(second_order=True)` lists each 1-hop neighbour followed
  by its own neighbours, and does not drop a 1-hop neighbour that already came in as a 2-hop one; `DecayAlphaHull`
  then gives dir_alpha to the first 1 + (number of 1-hop neighbours) entries of that interleaved row, so some
  2-hop words get dir_alpha, some 1-hop ones dir_alpha * dir_decay and some words two slots. Here the row is the
  word, its 1-hop neighbours, then the 2-hop ones not yet in it, and dir_alpha goes to exactly the word and its
  1-hop neighbours, the split the official's count (1 + the 1-hop list's length, from a separate 1-hop search)
  is computed for.
- Off-set slots weigh exactly 0 (logit -inf), so every virtual embedding is in the hull of its set; the official
  pads the rows with token 0 ([PAD]), whose slots keep softmax weight ~1e-6 each (log(0 + 1e-6)).
- Dirichlet draws are fresh for every forward (torch's gamma sampler); the official draws 10,000 per set size once
  (numpy) and cycles through them, a speed device. dir_alpha must be > 0 (the official's dir_alpha = 0, a uniformly
  drawn vertex, is not here).
- One loss goes back to the loop: the first K losses' parameter gradients are taken with `torch.autograd.grad` and
  added in the loop's backward (freelb.py's `_WithGrads`), the same sum as the official's K + 1 backward calls,
  also under gradient accumulation and data parallelism. Dropout is redrawn at every forward, as the official.
  The logits handed to the loop (training dynamics) are the sampled point's (k = 0).
- Validation runs the ensemble too (the official's dev evaluation during training takes one draw per example); the
  ensemble's draws are seeded with the run seed at every `predict` call (ensemble.py). Classification only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustft.checkpoint import set_torch_rng_state, torch_rng_state
from robustft.errors import UserError
from robustft.methods.base import StepOutput, TrainContext, model_inputs, task_loss
from robustft.methods.ensemble import RandomisedEnsemble
from robustft.methods.freelb import _WithGrads
from robustft.methods.perturb import embeds_forward
from robustft.methods.safer import continuation_ids, neighbour_slots, substitution_table, wordpiece_table


def two_hop(table: dict[str, list[str]], vocab: dict[str, int]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(1-hop, 1-hop + 2-hop) neighbour lists of the words in `vocab`, neighbours in `vocab` only.

    As the official `CachedWordSearcher`: lists filtered by the vocabulary first, 2-hop words reached through the
    filtered lists, the word itself never its own neighbour; unlike it, 1-hop words come first and no word twice.
    """
    first = {w: list(dict.fromkeys(n for n in ns if n in vocab and n != w)) for w, ns in table.items() if w in vocab}
    first = {w: ns for w, ns in first.items() if ns}
    both = {}
    for word, ns in first.items():
        seen, row = {word, *ns}, list(ns)
        for n in ns:
            for m in first.get(n, ()):
                if m not in seen:
                    seen.add(m)
                    row.append(m)
        both[word] = row
    return first, both


def hull_sets(tokenizer, table: dict[str, list[str]], nbr_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sets, sizes, first): sets[v, :sizes[v]] = token v, its 1-hop then 2-hop neighbours (at most nbr_num in all);
    the first first[v] slots (v and its 1-hop neighbours) take dir_alpha, the rest dir_alpha * dir_decay."""
    first, both = two_hop(table, tokenizer.get_vocab())
    sets, sizes = substitution_table(tokenizer, both)
    _, first_sizes = substitution_table(tokenizer, first)
    return sets[:, :nbr_num].contiguous(), sizes.clamp(max=nbr_num), first_sizes.clamp(max=nbr_num)


def hull_embeds(weight: torch.Tensor, syn: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """(B, L, d) sum_j coeff_j E[syn_j], as one `embedding_bag` (no (B, L, S, d) tensor: S is up to 50)."""
    b, length, s = syn.shape
    out = F.embedding_bag(syn.reshape(-1, s), weight, per_sample_weights=coeff.reshape(-1, s).to(weight.dtype),
                          mode="sum")
    return out.view(b, length, -1)


def ascend(logit: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    """z + step * g / (||g|| + 1e-6) per position, shifted so its max is 0 (official `WeightedEmbedding.forward`)."""
    z = logit + step_size * grad / (torch.linalg.vector_norm(grad, dim=-1, keepdim=True) + 1e-6)
    return z - z.amax(-1, keepdim=True)


class DNE(RandomisedEnsemble):
    """Training on Dirichlet-sampled and ascended points of each word's neighbourhood hull, prediction by an
    ensemble over sampled points (see the module docstring)."""

    def __init__(self, name: str, path: str, dir_alpha: float, dir_decay: float, nbr_num: int, adv_steps: int,
                 adv_step_size: float, ensemble_size: int, ensemble_method: str, predict_batch_size: int) -> None:
        super().__init__(name, ensemble_size, ensemble_method, predict_batch_size)
        if float(dir_alpha) <= 0 or float(dir_decay) <= 0:
            raise UserError(f"method.dir_alpha={dir_alpha}, dir_decay={dir_decay}: Dirichlet concentrations must be "
                            f"> 0; set both > 0 (TextDefender: 1.0 and 0.5)")
        if int(nbr_num) < 2 or int(adv_steps) < 0 or float(adv_step_size) < 0:
            raise UserError(f"method.nbr_num={nbr_num}, adv_steps={adv_steps}, adv_step_size={adv_step_size}: out of "
                            f"range; set nbr_num >= 2 (the word and a neighbour), adv_steps and adv_step_size >= 0")
        self.path, self.dir_alpha, self.dir_decay = path, float(dir_alpha), float(dir_decay)
        self.nbr_num, self.adv_steps, self.adv_step_size = int(nbr_num), int(adv_steps), float(adv_step_size)
        self.sets = torch.zeros(0, 1, dtype=torch.long)
        self.sizes = self.first = torch.zeros(0, dtype=torch.long)
        self.continuation = torch.zeros(0, dtype=torch.bool)
        self.params: list[nn.Parameter] | None = None
        self.start: torch.Tensor | None = None  # the last step's Dirichlet draw and final weights (tests)
        self.coeff: torch.Tensor | None = None

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().setup(model, ctx)
        if not isinstance(getattr(model, "get_input_embeddings", lambda: None)(), nn.Embedding):
            raise UserError(f"method={self.name} mixes word embeddings; {type(model).__name__} has no "
                            f"get_input_embeddings() embedding layer (use a Hugging Face transformer model)")
        table = wordpiece_table(ctx, self.path, self.name)
        self.sets, self.sizes, self.first = hull_sets(ctx.tokenizer, table, self.nbr_num)
        self.continuation = continuation_ids(ctx.tokenizer, len(self.sizes))
        return model

    def flops_factor(self) -> float:
        """K + 1 forward + backward passes (each ascent step's backward gives the weights' gradients too)."""
        return float(self.adv_steps + 1)

    def slots(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, S) neighbourhood ids of every position and which slots are in its set (slot 0: the token)."""
        return neighbour_slots(batch, self.sets, self.sizes, self.continuation, self.special_ids)

    def dirichlet(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, S) weights ~ Dirichlet over each position's set (dir_alpha on the word and 1-hop slots,
        dir_alpha * dir_decay on 2-hop ones), exactly 0 off the set."""
        first = torch.arange(valid.shape[-1], device=ids.device) < self.first.to(ids.device)[ids].unsqueeze(-1)
        conc = torch.full(valid.shape, self.dir_alpha * self.dir_decay, device=ids.device).masked_fill(first,
                                                                                                       self.dir_alpha)
        g = torch.distributions.Gamma(conc, torch.ones_like(conc), validate_args=False).sample() * valid  # no sync
        g[..., 0] += g.sum(-1) == 0  # every gamma draw underflowed (tiny dir_alpha): the word itself
        return g / g.sum(-1, keepdim=True)

    def start_logits(self, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """log(c + 1e-6) of a Dirichlet draw c, -inf off the set, shifted to max 0 (official `WeightedEmbedding`)."""
        self.start = self.dirichlet(batch["input_ids"], valid)
        z = torch.log(self.start + 1e-6).masked_fill(~valid, -torch.inf)
        return z - z.amax(-1, keepdim=True)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.params is None:
            self.params = [p for p in model.parameters() if p.requires_grad]
        syn, valid = self.slots(batch)
        z = self.start_logits(batch, valid)  # the global RNG: restored on resume
        weight, labels = model.get_input_embeddings().weight, batch["labels"]
        used, buffer, earlier, first = [], None, [], None
        for k in range(self.adv_steps + 1):
            last = k == self.adv_steps
            z.requires_grad_(not last)
            logits = embeds_forward(model, batch, hull_embeds(weight, syn, F.softmax(z, -1)))
            loss = task_loss(logits, labels, False)
            first = logits.detach() if first is None else first
            if last:
                break
            grads = torch.autograd.grad(loss, [z, *self.params], allow_unused=True)
            if buffer is None:  # parameters outside the graph keep no gradient, as in a plain backward
                used = [p for p, g in zip(self.params, grads[1:]) if g is not None]
                buffer = [g for g in grads[1:] if g is not None]
            else:
                torch._foreach_add_(buffer, [g for g in grads[1:] if g is not None])
            earlier.append(loss.detach())
            z = ascend(z.detach(), grads[0], self.adv_step_size)
        self.coeff = F.softmax(z.detach(), -1)
        if buffer is not None:
            loss = _WithGrads.apply(loss + torch.stack(earlier).sum(), buffer, *used)
        return StepOutput(loss, first)

    def copy_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of `ensemble_size` Dirichlet draws per row (rows [i * n, (i + 1) * n) are row i's), the draws
        seeded with the run seed; torch's RNG is put back afterwards, so prediction never moves training's."""
        inputs = {k: v.repeat_interleave(self.ensemble_size, dim=0) for k, v in model_inputs(batch).items()}
        syn, valid = self.slots(inputs)
        device = syn.device
        saved = torch_rng_state(device)
        try:
            torch.random.default_generator.manual_seed(self.seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(self.seed)
            coeff = F.softmax(self.start_logits(inputs, valid), -1)
        finally:
            set_torch_rng_state(saved, device)
        weight, step = model.get_input_embeddings().weight, self.predict_batch_size * self.ensemble_size
        out = []
        for s in range(0, syn.shape[0], step):
            chunk = {k: v[s : s + step] for k, v in inputs.items()}
            out.append(embeds_forward(model, chunk, hull_embeds(weight, syn[s : s + step], coeff[s : s + step])))
        return torch.cat(out)
