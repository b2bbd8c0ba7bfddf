"""Goal functions: what counts as success, the score a search maximises, and the query budget."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

from robustft.robustness.attack.text import AttackedText


@dataclass(frozen=True)
class GoalResult:
    text: AttackedText
    probs: np.ndarray
    score: float  # higher = closer to the goal
    succeeded: bool

    @property
    def pred(self) -> int:
        return int(np.argmax(self.probs))


# What a search yields to the driver: the model inputs to score; it is sent back their probabilities.
Request = list[tuple[str, ...]]
Scoring = Generator[Request, np.ndarray, list[GoalResult]]


class Session:
    """One example's goal: scores candidate texts in one batched request and enforces the query budget.

    As in TextAttack, every text sent to the model counts as a query (the clean input included), and a
    batch that would overrun the budget is cut to what is left; `over` then ends the search.

    `evaluate` is a generator (`results = yield from session.evaluate(texts)`): it yields the texts to
    score and receives their probabilities, so the driver (Attack.attack_many) can merge the requests of
    many examples into one forward pass.
    """

    def __init__(self, goal: UntargetedClassification, label: int) -> None:
        self.goal, self.label = goal, label
        self.queries = 0
        self.calls = 0  # requests made (each is scored within one predictor call)

    @property
    def over(self) -> bool:
        return self.goal.query_budget is not None and self.queries >= self.goal.query_budget

    def evaluate(self, texts: Sequence[AttackedText]) -> Scoring:
        if self.goal.query_budget is not None:
            texts = list(texts)[: max(0, self.goal.query_budget - self.queries)]
        if not texts:
            return []
        self.queries += len(texts)
        self.calls += 1
        probs = yield [t.inputs for t in texts]
        probs = np.asarray(probs, dtype=np.float64)
        return [self.goal.result(t, p, self.label) for t, p in zip(texts, probs)]


class UntargetedClassification:
    """Succeed when the predicted class differs from the gold label; score = 1 - p(gold) (TextAttack)."""

    def __init__(self, query_budget: int | None = None) -> None:
        if query_budget is not None and int(query_budget) < 1:
            raise ValueError("query_budget must be >= 1 or null (unlimited)")
        self.query_budget = None if query_budget is None else int(query_budget)

    def session(self, label: int) -> Session:
        return Session(self, label)

    def result(self, text: AttackedText, probs: np.ndarray, label: int) -> GoalResult:
        return GoalResult(text, probs, float(1.0 - probs[label]), int(np.argmax(probs)) != label)
