"""An attack = goal function + constraints + transformation + search method (TextAttack's structure).

A new attack is a new composition of these parts in YAML (conf/robustness/textfooler.yaml, pwws.yaml,
typo.yaml), not new code.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustft.robustness.attack.constraints import Constraint
from robustft.robustness.attack.goal import Request, UntargetedClassification
from robustft.robustness.attack.search import AttackRun, SearchMethod
from robustft.robustness.attack.text import AttackedText
from robustft.robustness.attack.transformations import Transformation

SUCCEEDED, FAILED, SKIPPED = "succeeded", "failed", "skipped"


@dataclass
class AttackResult:
    status: str  # succeeded | failed | skipped (the clean input was already misclassified)
    original: AttackedText
    perturbed: AttackedText
    label: int
    original_pred: int
    perturbed_pred: int
    queries: int
    words_changed: int

    @property
    def n_words(self) -> int:
        return len(self.original.words)


class Attack:
    def __init__(self, goal: UntargetedClassification, transformation: Transformation,
                 constraints: Sequence[Constraint], search: SearchMethod) -> None:
        self.goal, self.transformation, self.search = goal, transformation, search
        self.constraints = list(constraints)

    def check(self, data_dir: Path | None) -> None:
        self.transformation.check(data_dir)
        for c in self.constraints:
            c.check(data_dir)

    def setup(self, data_dir: Path | None) -> None:
        self.transformation.setup(data_dir)
        for c in self.constraints:
            c.setup(data_dir)

    def run(self, fields: Sequence[str], label: int, target: int, seed: int, key: int,
            unk_token: str) -> Generator[Request, np.ndarray, AttackResult]:
        """One example's attack as a generator of scoring requests (see `attack_many`)."""
        original = AttackedText.create(tuple(fields), target)
        session = self.goal.session(int(label))
        run = AttackRun(self.constraints, self.transformation, session, original, seed, key, unk_token)
        initial = (yield from session.evaluate([original]))[0]
        if initial.succeeded:
            final, status = initial, SKIPPED
        else:
            final = yield from self.search.search(run, initial)
            status = SUCCEEDED if final.succeeded else FAILED
        return AttackResult(status, original, final.text, int(label), initial.pred, final.pred, session.queries,
                            final.text.words_changed(original))

    def attack(self, predictor, fields: Sequence[str], label: int, target: int, seed: int = 0,
               key: int = 0) -> AttackResult:
        """Attack one example (field `target` is modified); `key` (e.g. its idx) seeds its randomness."""
        return self.attack_many(predictor, [(fields, label, key)], target, seed, concurrency=1)[0]

    def attack_many(self, predictor, examples: Sequence[tuple[Sequence[str], int, int]], target: int,
                    seed: int = 0, concurrency: int = 32) -> list[AttackResult]:
        """Attack (fields, label, key) examples, `concurrency` at a time, merging their requests.

        Each example's search runs as a generator; at every step the pending requests of all active
        examples (each one's candidates for one position, or its importance probes) are concatenated
        into one predictor call. The searches are unchanged, so results equal one-at-a-time attacks;
        only the batching (and so float-level padding effects) differs. TextAttack scores one
        example's candidates per call.
        """
        unk = getattr(predictor, "unk_token", None) or "[UNK]"
        results: list[AttackResult | None] = [None] * len(examples)
        todo = iter(range(len(examples)))
        active: dict[int, tuple[Generator[Request, np.ndarray, AttackResult], Request]] = {}

        def start() -> None:
            for i in todo:
                fields, label, key = examples[i]
                gen = self.run(fields, label, target, seed, key, unk)
                try:
                    active[i] = (gen, next(gen))
                    return
                except StopIteration as done:  # pragma: no cover - the clean input is always scored
                    results[i] = done.value

        for _ in range(max(1, int(concurrency))):
            start()
        while active:
            order = list(active)
            flat = [x for i in order for x in active[i][1]]
            probs = np.asarray(predictor.probs(flat))
            k = 0
            for i in order:
                gen, request = active[i]
                chunk, k = probs[k : k + len(request)], k + len(request)
                try:
                    active[i] = (gen, gen.send(chunk))
                except StopIteration as done:
                    results[i] = done.value
                    del active[i]
                    start()
        return [r for r in results if r is not None]


def attack_metrics(results: Sequence[AttackResult]) -> dict[str, float]:
    """TextAttack's summary (as fractions, except the percentage of perturbed words).

    clean_acc = 1 - skipped/n; acc_under_attack = failed/n; attack_success_rate = succeeded /
    (succeeded + failed); avg_perturbed_words_pct over successful attacks; avg_queries over attacks that
    were not skipped. The word percentage counts words of the attacked field only (TextAttack counts all
    fields; the same for single-sentence tasks, more meaningful for pairs where one field is frozen).
    """
    n = len(results)
    ok = [r for r in results if r.status == SUCCEEDED]
    failed = [r for r in results if r.status == FAILED]
    attacked = ok + failed
    nan = float("nan")
    return {
        "n": float(n),
        "clean_acc": len(attacked) / n if n else nan,
        "acc_under_attack": len(failed) / n if n else nan,
        "attack_success_rate": len(ok) / len(attacked) if attacked else nan,
        "avg_perturbed_words_pct": float(np.mean([100.0 * r.words_changed / max(1, r.n_words) for r in ok]))
        if ok else nan,
        "avg_queries": float(np.mean([r.queries for r in attacked])) if attacked else nan,
        "n_succeeded": float(len(ok)),
        "n_failed": float(len(failed)),
        "n_skipped": float(n - len(attacked)),
    }


def result_record(r: AttackResult, names: Sequence[str], idx: Any, label_names: Sequence[str]) -> dict[str, Any]:
    """One samples.jsonl line."""
    return {
        "idx": idx,
        "status": r.status,
        "label": label_names[r.label],
        "original_pred": label_names[r.original_pred],
        "perturbed_pred": label_names[r.perturbed_pred],
        "queries": r.queries,
        "words_changed": r.words_changed,
        "n_words": r.n_words,
        "attacked_field": names[r.original.target],
        "original": dict(zip(names, r.original.inputs)),
        "perturbed": dict(zip(names, r.perturbed.inputs)),
        "modified": sorted(int(i) for i in r.perturbed.modified if r.perturbed.words.words[i] != r.original.words.words[i]),
    }

