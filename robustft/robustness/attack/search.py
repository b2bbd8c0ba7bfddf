"""Search methods: how an attack walks the candidate space of one example."""

from __future__ import annotations

import zlib
from collections.abc import Generator, Sequence

import numpy as np

from robustft.robustness.attack.constraints import Constraint
from robustft.robustness.attack.goal import GoalResult, Request, Scoring, Session
from robustft.robustness.attack.text import AttackedText
from robustft.robustness.attack.transformations import Transformation

WIR_METHODS = ("delete", "unk", "weighted-saliency", "random")


class AttackRun:
    """What a search method sees of one example: scoring, allowed positions, candidates, randomness."""

    def __init__(self, constraints: Sequence[Constraint], transformation: Transformation, session: Session,
                 original: AttackedText, seed: int, key: int, unk_token: str) -> None:
        self.constraints, self.transformation = list(constraints), transformation
        self.session, self.original = session, original
        self.seed, self.key, self.unk_token = seed, key, unk_token

    @property
    def over(self) -> bool:
        return self.session.over

    def evaluate(self, texts: Sequence[AttackedText]) -> Scoring:
        """Use as `results = yield from run.evaluate(texts)`: all texts go to the model in one call."""
        return self.session.evaluate(texts)

    def rng(self, *parts: int | str) -> np.random.Generator:
        """A generator seeded by (seed, example key, parts): independent of search order."""
        ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
        return np.random.default_rng([self.seed, self.key, *ints])

    def indices(self, text: AttackedText) -> list[int]:
        """Positions every constraint allows, in text order."""
        allowed = set(range(len(text.words)))
        for c in self.constraints:
            sub = c.allowed_indices(text, self.original)
            if sub is not None:
                allowed &= sub
        return sorted(allowed)

    def transform(self, text: AttackedText, index: int) -> list[AttackedText]:
        """Candidates at one position that pass every constraint (empty if the position is not allowed)."""
        if index not in self.indices(text):
            return []
        word = text.words.words[index]
        original_word = self.original.words.words[index]
        subs = self.transformation.candidates(word, self.rng("pos", index))
        out = []
        for s in subs:
            if s != word and all(c.allows(original_word, s) for c in self.constraints):
                out.append(text.with_word(index, s))
        return out


class SearchMethod:
    """Base. `search` is a generator: score texts with `results = yield from run.evaluate(texts)` and
    `return` the final GoalResult; the driver batches the requests of many examples together."""

    def search(self, run: AttackRun, initial: GoalResult) -> Generator[Request, np.ndarray, GoalResult]:
        raise NotImplementedError


class GreedyWordSwapWIR(SearchMethod):
    """Rank positions by importance, then greedily take the best swap at each position in that order.

    wir_method:
      delete             TextFooler: importance = goal score with the word deleted (TextAttack's recipe).
      unk                the word replaced by the tokenizer's unknown token (DeepWordBug in TextAttack).
      weighted-saliency  PWWS: softmax(saliency) x best score gain of a swap at that position.
      random             a seeded random order (a baseline).

    Like TextAttack, only positions allowed by the constraints are ranked; a swap is kept only if it
    raises the score; the search stops at the first success, or when the budget or positions run out.
    Every position's candidates are scored in one batched call.
    """

    def __init__(self, wir_method: str = "delete") -> None:
        if wir_method not in WIR_METHODS:
            raise ValueError(f"wir_method '{wir_method}' is not one of {WIR_METHODS}")
        self.wir_method = wir_method

    def order(self, run: AttackRun, initial: GoalResult,
              indices: list[int]) -> Generator[Request, np.ndarray, list[int] | None]:
        """Positions, most important first; None when the budget ran out while ranking."""
        text = initial.text
        if self.wir_method == "random":
            return [indices[i] for i in run.rng("order").permutation(len(indices))]
        if self.wir_method == "delete":
            probes = [text.without_word(i) for i in indices]
        else:
            probes = [text.with_word(i, run.unk_token) for i in indices]
        results = yield from run.evaluate(probes)
        if len(results) < len(indices):
            return None
        scores = np.array([r.score for r in results])
        if self.wir_method == "weighted-saliency":
            # PWWS (Ren et al. 2019): saliency S_i = p(y|x) - p(y|x with w_i -> unk) = score gain;
            # softmax over positions, times the best gain of a real swap at i. TextAttack multiplies by
            # the swap's raw score instead of the gain (it adds 1 - p(y|x) to every term); we follow the
            # paper. All positions' swaps go into one batched call.
            saliency = scores - initial.score
            weights = np.exp(saliency - saliency.max())
            weights /= weights.sum()
            per_pos = [run.transform(text, i) for i in indices]
            flat = [c for cands in per_pos for c in cands]
            swap_results = yield from run.evaluate(flat)
            if len(swap_results) < len(flat):
                return None
            gains, k = np.zeros(len(indices)), 0
            for j, cands in enumerate(per_pos):
                if cands:
                    gains[j] = max(r.score for r in swap_results[k : k + len(cands)]) - initial.score
                k += len(cands)
            scores = weights * gains
        order = np.argsort(-scores, kind="stable")
        return [indices[j] for j in order]

    def search(self, run: AttackRun, initial: GoalResult) -> Generator[Request, np.ndarray, GoalResult]:
        indices = run.indices(initial.text)
        if not indices:
            return initial
        order = yield from self.order(run, initial, indices)
        if order is None:
            return initial
        current = initial
        for i in order:
            if run.over:
                break
            candidates = run.transform(current.text, i)
            if not candidates:
                continue
            results = yield from run.evaluate(candidates)
            if not results:
                break
            best = max(results, key=lambda r: r.score)  # first of equal scores: candidate order
            if best.score > current.score:
                current = best
                if current.succeeded:
                    break
        return current
