"""Discrete adversarial training with a cheap word-substitution attack in the loop: A2T (Yoo & Qi, "Towards
Improving Adversarial Training of NLP Models", Findings of EMNLP 2021; QData/TextAttack-A2T, which trains
with TextAttack's `Trainer` and its `A2TYoo2021` recipe).

Every `every_steps` micro-batches (after `clean_batches` clean ones), a seeded `share` of the batch's examples
is attacked with the model in eval mode; the successful adversarial examples (TextAttack keeps successful
results only) are trained on beside the clean batch with TextAttack's per-example weighting:

    loss = (sum_clean CE_i + alpha * sum_adv CE_j) / (n_clean + n_adv)

which is `Trainer.training_step`'s `mean(CE * w)`, w = alpha on adversarial rows, over a batch holding both.
The default attack (conf/method/adv_train.yaml) is A2T's built from robustft's attack components: words
ranked by gradient importance (`GreedyWordSwapGradient`: the l1 norm of the mean gradient of the loss
against the predicted label, over the word's sub-word tokens, as TextAttack's "gradient" ranking), greedy
swaps with counter-fitted neighbours, RepeatModification, StopwordModification and MaxModificationRate(0.1,
min 4 words). Any attack composed of the same parts may be configured instead (`method.attack.search=...`).

Departures (each because of this loop's interface or what is offline):
- Adversarial examples are made per batch from that batch's examples, not once per epoch for a share of the
  whole training set shuffled into the data (TextAttack `num_train_adv_examples`, `attack_epoch_interval`):
  the loop owns the data order, and per-batch generation shards itself under data parallelism (each rank
  attacks its own rows). With `every_steps=k > 1` the latest adversarial set is trained on beside each of the
  next k batches; it is part of the method's resume state (every rank's, gathered), so a resume mid-epoch
  continues with it. Each rank averages over its own clean and adversarial rows, so under data parallelism
  the weighting is per rank (ranks can keep different numbers of successful examples).
- `clean_batches` (micro-batches before the first generation) stands for TextAttack's `num_clean_epochs`
  (default 1): the method does not know the epoch length; set it to the batches per epoch to match.
- A2T's sentence-encoder (SBERT cos >= 0.9), part-of-speech and embedding-distance (cos >= 0.8) constraints
  are not available offline; the counter-fitted lists (<= 8 neighbours, A2T takes 20 nearest) stand in for them.
- Generation runs in eval mode with no dropout: TextAttack's `HuggingFaceModelWrapper.get_grad` switches the
  model to train mode for the gradient ranking (dropout on), and TextAttack-A2T issue 1 reports adversarial
  examples generated in train mode.
- Inputs are scored in length-sorted, dynamically padded batches (TextAttack pads to the model's max length).
Classification only.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from robustft import distributed
from robustft.errors import UserError
from robustft.methods.base import Method, StepOutput, TrainContext, model_inputs
from robustft.methods.perturb import embeds_forward, word_embeddings
from robustft.robustness.attack.attack import SUCCEEDED, Attack
from robustft.robustness.attack.goal import GoalResult, Request
from robustft.robustness.attack.search import AttackRun, GreedyWordSwapWIR
from robustft.robustness.attack.text import Words


class GreedyWordSwapGradient(GreedyWordSwapWIR):
    """A2T's search: positions ranked by gradient importance, then TextAttack's greedy swaps.

    The importance needs the model's gradient, which the attack's scoring interface (probabilities only)
    does not carry, so `AdvTrain` computes it for a batch of examples first and hands it over by example key.
    """

    def __init__(self) -> None:
        super().__init__("random")
        self.wir_method = "gradient"
        self.importance: dict[int, np.ndarray] = {}

    def order(self, run: AttackRun, initial: GoalResult,
              indices: list[int]) -> Generator[Request, np.ndarray, list[int] | None]:
        scores = self.importance[run.key]
        yield from ()  # no model queries: the ranking cost one gradient pass, counted by AdvTrain
        return [indices[j] for j in np.argsort(-scores[indices], kind="stable")]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the attack's words (robustft.robustness.attack.text.Words) in `text`."""
    spans, pos = [], 0
    for k, piece in enumerate(Words.from_text(text).pieces):
        if k % 2:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans


def word_importance(model: nn.Module, tokenizer, examples: Sequence[tuple[str, ...]], target: int,
                    max_length: int, device: torch.device) -> tuple[list[np.ndarray], int]:
    """Per word of field `target`: ||mean over its tokens of dL/de||_1, L = CE against the predicted label.

    One forward + input-gradient backward over the examples (no weight gradients). Returns the scores and
    the padded tokens processed (for the cost).
    """
    enc = tokenizer(*zip(*examples), truncation=True, max_length=max_length, padding=True,
                    return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping").numpy()
    batch = {k: v.to(device) for k, v in enc.items()}
    embeds = word_embeddings(model, batch).detach().requires_grad_()
    logits = embeds_forward(model, batch, embeds).float()
    loss = F.cross_entropy(logits, logits.argmax(-1), reduction="sum")  # sum: each row its own gradient
    (grad,) = torch.autograd.grad(loss, embeds)
    grad = grad.float().cpu().numpy()
    out = []
    for i, fields in enumerate(examples):
        seq = enc.sequence_ids(i)
        spans = word_spans(fields[target])
        scores = np.zeros(len(spans))
        for w, (a, b) in enumerate(spans):
            toks = [t for t, s in enumerate(seq) if s == target and offsets[i, t, 0] < b and offsets[i, t, 1] > a]
            if toks:
                scores[w] = np.abs(grad[i, toks].mean(axis=0)).sum()
        out.append(scores)
    return out, int(batch["input_ids"].numel())


class BatchScorer:
    """The attack's predictor: probabilities of raw text tuples in length-sorted, dynamically padded batches.

    Records the model's mode at every call (the tests check generation ran in eval mode), the queries and
    the padded tokens (the cost).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int, device: torch.device, batch_size: int) -> None:
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.device, self.batch_size = device, batch_size
        self.unk_token = getattr(tokenizer, "unk_token", None) or "[UNK]"
        self.queries = self.tokens = 0
        self.modes: set[bool] = set()

    @torch.no_grad()
    def probs(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        enc = self.tokenizer(*zip(*texts), truncation=True, max_length=self.max_length)
        order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
        out = np.empty((len(texts), self.model.config.num_labels))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            feats = {k: [enc[k][i] for i in rows] for k in enc.keys()}
            batch = {k: v.to(self.device) for k, v in self.tokenizer.pad(feats, return_tensors="pt").items()}
            self.modes.add(self.model.training)
            self.queries += len(rows)
            self.tokens += int(batch["input_ids"].numel())
            out[rows] = torch.softmax(self.model(**model_inputs(batch)).logits.float(), -1).cpu().numpy()
        return out


class AdvTrain(Method):
    """Training on attack-generated adversarial examples beside the clean batch (A2T; see the module docstring)."""

    def __init__(self, name: str, alpha: float, share: float, every_steps: int, clean_batches: int,
                 concurrency: int, attack: Attack) -> None:
        super().__init__(name)
        if not 0 < float(share) <= 1:
            raise UserError(f"method.share={share} must be in (0, 1] (the share of each batch that is attacked)")
        if int(every_steps) < 1 or int(clean_batches) < 0 or float(alpha) < 0:
            raise UserError(f"method.every_steps={every_steps}, clean_batches={clean_batches}, alpha={alpha}: "
                            f"every_steps must be >= 1, clean_batches and alpha >= 0")
        self.alpha, self.share, self.every_steps = float(alpha), float(share), int(every_steps)
        self.clean_batches, self.concurrency, self.attack = int(clean_batches), int(concurrency), attack
        self.calls = 0  # micro-batches trained (the generation schedule)
        self.pool: list[dict[str, Any]] = []  # the latest adversarial examples: {"fields", "label", "idx"}
        self.cost = {"queries": 0, "score_tokens": 0, "grad_tokens": 0, "adv_tokens": 0, "attacked": 0,
                     "succeeded": 0}
        self.modes: set[bool] = set()  # model.training seen while generating (tests)
        self.train: Dataset | None = None
        self.rows: dict[int, int] = {}
        self.n_params = 0

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        if bool(ctx.task.is_regression):
            raise UserError(f"method={self.name} attacks a classifier; task={ctx.task.name} is a regression task")
        self.attack.check(ctx.data_dir)
        self.attack.setup(ctx.data_dir)
        from robustft.models import count_params

        self.n_params = count_params(model, non_embedding=True)
        return super().setup(model, ctx)

    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        """Keep the raw texts: the loop's batches carry only token ids and `idx`."""
        self.train = train
        self.rows = {int(i): r for r, i in enumerate(train["idx"])}
        return train

    # --- generation ---------------------------------------------------------------------------------
    def generate(self, model: nn.Module, idx: Sequence[int]) -> list[dict[str, Any]]:
        """Attack a seeded `share` of the examples `idx` in eval mode; the successful adversarial examples."""
        if not len(idx):  # a rank without rows in this micro-batch (data parallel)
            return []
        ctx, fields = self.ctx, list(self.ctx.task.text_fields)
        rng = np.random.default_rng([ctx.seed, self.calls])
        pick = sorted(rng.choice(len(idx), max(1, round(self.share * len(idx))), replace=False).tolist())
        raw = self.train[[self.rows[int(idx[i])] for i in pick]]
        examples = [(tuple(raw[f][j] for f in fields), int(raw["label"][j]), int(raw["idx"][j]))
                    for j in range(len(pick))]
        target, max_length = len(fields) - 1, int(ctx.trainer.max_length)
        scorer = self.make_scorer(model, max_length)
        was_training = model.training
        model.eval()
        try:
            if isinstance(self.attack.search, GreedyWordSwapGradient):
                self.modes.add(model.training)
                scores, tokens = word_importance(model, ctx.tokenizer, [e[0] for e in examples], target,
                                                 max_length, ctx.device)
                self.attack.search.importance = {e[2]: s for e, s in zip(examples, scores)}
                self.cost["grad_tokens"] += tokens
            results = self.attack.attack_many(scorer, examples, target, seed=ctx.seed, concurrency=self.concurrency)
        finally:
            model.train(was_training)
        self.modes |= scorer.modes
        self.cost["queries"] += scorer.queries
        self.cost["score_tokens"] += scorer.tokens
        self.cost["attacked"] += len(examples)
        ok = [(e[2], r) for e, r in zip(examples, results, strict=True) if r.status == SUCCEEDED]
        self.cost["succeeded"] += len(ok)
        return [{"fields": list(r.perturbed.inputs), "label": r.label, "idx": i} for i, r in ok]

    def make_scorer(self, model: nn.Module, max_length: int) -> BatchScorer:
        """The attack's predictor (scripts/bench_adv_gen.py swaps in TextAttack-style padding)."""
        ctx = self.ctx
        return BatchScorer(model, ctx.tokenizer, max_length, ctx.device, int(ctx.trainer.eval_batch_size))

    def encode(self, pool: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
        """The adversarial examples as one batch padded to its longest (dynamic padding)."""
        enc = self.ctx.tokenizer(*zip(*[tuple(p["fields"]) for p in pool]), truncation=True,
                                 max_length=int(self.ctx.trainer.max_length), padding=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in enc.items()}
        batch["labels"] = torch.tensor([p["label"] for p in pool], dtype=torch.long, device=device)
        return batch

    # --- the step -----------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        due = self.calls >= self.clean_batches and (self.calls - self.clean_batches) % self.every_steps == 0
        if due:
            self.pool = self.generate(model, batch["idx"].tolist())
        self.calls += 1
        logits = self.forward(model, batch)
        total = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        n = int(batch["labels"].numel())
        if self.pool:
            adv = self.encode(self.pool, batch["labels"].device)
            adv_loss = F.cross_entropy(self.forward(model, adv).float(), adv["labels"], reduction="sum")
            total = total + self.alpha * adv_loss
            n += len(self.pool)
            self.cost["adv_tokens"] += int(adv["attention_mask"].sum())
        return StepOutput(total / n, logits.detach(), {"adv_train/n_adv": float(len(self.pool))})

    # --- cost and state -----------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """Generation queries and FLOPs (2N per scored token, 4N per gradient-ranking token: forward + input
        gradient) and the adversarial rows' training FLOPs (6N per real token), all summed over ranks."""
        keys = sorted(self.cost)  # summed over ranks: each generated for its own rows
        total = distributed.all_reduce_sum(torch.tensor([float(self.cost[k]) for k in keys], dtype=torch.float64))
        cost = dict(zip(keys, total.tolist(), strict=True))
        adv_flops = 6.0 * self.n_params * cost["adv_tokens"]
        gen = 2.0 * self.n_params * cost["score_tokens"] + 4.0 * self.n_params * cost["grad_tokens"]
        out = {"cost/adv_generation_queries": cost["queries"], "cost/adv_generation_flops": gen,
               "cost/adv_train_flops": adv_flops, "adv_train/attacked": cost["attacked"],
               "adv_train/succeeded": cost["succeeded"]}
        if "cost/train_flops" in train_metrics:
            out["cost/total_flops"] = float(train_metrics["cost/train_flops"]) + adv_flops + gen
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every rank's adversarial set and counters (gathered: each rank attacked its own rows)."""
        mine = {"pool": [dict(p) for p in self.pool], "cost": dict(self.cost)}
        return {"calls": self.calls, "ranks": distributed.all_gather_object(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's entry; under another number of processes the set is dropped (regenerated when due)."""
        self.calls = int(state.get("calls", 0))
        ranks = state.get("ranks") or []
        same = len(ranks) == distributed.world_size()
        mine = ranks[distributed.rank()] if same else {}
        self.pool = [{"fields": list(p["fields"]), "label": int(p["label"]), "idx": int(p["idx"])}
                     for p in mine.get("pool", [])]
        if same:
            self.cost.update({k: int(v) for k, v in (mine.get("cost") or {}).items()})
        elif ranks:  # the counters of all old ranks on rank 0, so the sums in `metrics` stay right
            for k in self.cost:
                self.cost[k] = sum(int(r["cost"][k]) for r in ranks) if distributed.rank() == 0 else 0
