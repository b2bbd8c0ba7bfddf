"""Transformations: the substitutes proposed for one word (word swaps only, so positions stay aligned)."""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path

import numpy as np

from robustft.robustness.attack.text import match_case
from robustft.robustness.common import resolve_resource

_LETTERS = string.ascii_lowercase


class Transformation:
    """Base: `candidates(word, rng)` returns substitutes for `word` (the original excluded, no repeats).

    `rng` is seeded per (seed, example, position) by the attack, so random transformations give the
    same candidates whenever a search revisits a position, and results do not depend on search order.
    """

    def check(self, data_dir: Path | None) -> None:
        """Raise UserError when a resource is missing (called before training)."""

    def setup(self, data_dir: Path | None) -> None:
        """Load resources (called once before the first attack)."""

    def candidates(self, word: str, rng: np.random.Generator) -> list[str]:
        raise NotImplementedError


@functools.lru_cache(maxsize=4)
def load_table(path: str) -> dict[str, list[str]]:
    """{word: neighbours}, lower-case keys; cached (2 MB of JSON, shared by textfooler and pwws)."""
    raw = json.loads(Path(path).read_text("utf-8"))
    return {k.lower(): list(v) for k, v in raw.items() if v}


class WordSwapNeighbors(Transformation):
    """Swap a word for its counter-fitted neighbours (a JSON {word: [neighbours]}, Jia et al. 2019).

    Lookup is case-insensitive and the substitute takes the original's case. TextAttack's TextFooler
    takes the 50 nearest counter-fitted vectors with cosine >= 0.5; the vectors are not available
    offline, and these lists (at most 8 per word) are the attack surface of Alzantot et al. / Jia et al.
    """

    def __init__(self, path: str, max_candidates: int | None = None) -> None:
        self.path = path
        self.max_candidates = max_candidates
        self.table: dict[str, list[str]] | None = None

    def check(self, data_dir: Path | None) -> None:
        resolve_resource(self.path, data_dir, "word-substitution table", "transformation.path")

    def setup(self, data_dir: Path | None) -> None:
        if self.table is None:
            self.table = load_table(str(resolve_resource(self.path, data_dir, "word-substitution table")))

    def candidates(self, word: str, rng: np.random.Generator) -> list[str]:
        assert self.table is not None, "setup() first"
        subs = self.table.get(word.lower(), [])
        if self.max_candidates:
            subs = subs[: int(self.max_candidates)]
        return [match_case(word, s) for s in subs]


class _CharEdit(Transformation):
    """DeepWordBug-style edit of one word; `n` random edits per word (TextAttack's random_one = n=1).

    `skip_first_last` keeps the first and last letter (a common readability variant; off by default,
    as in TextAttack).
    """

    min_len = 2

    def __init__(self, n: int = 1, skip_first_last: bool = False) -> None:
        self.n = int(n)
        self.skip_first_last = bool(skip_first_last)

    def positions(self, word: str, extra: int = 0) -> range:
        lo, hi = (1, len(word) - 1) if self.skip_first_last else (0, len(word))
        return range(lo, hi + extra)

    def edit(self, word: str, rng: np.random.Generator) -> str | None:
        raise NotImplementedError

    def candidates(self, word: str, rng: np.random.Generator) -> list[str]:
        if len(word) < self.min_len:
            return []
        out: list[str] = []
        for _ in range(self.n):
            new = self.edit(word, rng)
            if new and new != word and new not in out:
                out.append(new)
        return out


class CharSwap(_CharEdit):
    """Swap two neighbouring characters."""

    def edit(self, word: str, rng: np.random.Generator) -> str | None:
        pos = list(self.positions(word))[:-1]  # i and i+1 both inside the editable span
        if not pos:
            return None
        i = int(rng.choice(pos))
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


class CharDelete(_CharEdit):
    """Delete one character (never empties a word)."""

    def edit(self, word: str, rng: np.random.Generator) -> str | None:
        pos = list(self.positions(word))
        if not pos:
            return None
        i = int(rng.choice(pos))
        return word[:i] + word[i + 1 :]


class CharInsert(_CharEdit):
    """Insert a random lower-case letter."""

    min_len = 1

    def edit(self, word: str, rng: np.random.Generator) -> str | None:
        pos = list(self.positions(word, extra=1 if not self.skip_first_last else 0))
        if not pos:
            return None
        i = int(rng.choice(pos))
        return word[:i] + _LETTERS[int(rng.integers(26))] + word[i:]


class CharSubstitute(_CharEdit):
    """Replace one character by a different random lower-case letter."""

    min_len = 1

    def edit(self, word: str, rng: np.random.Generator) -> str | None:
        pos = list(self.positions(word))
        if not pos:
            return None
        i = int(rng.choice(pos))
        options = [c for c in _LETTERS if c != word[i].lower()]
        return word[:i] + options[int(rng.integers(len(options)))] + word[i + 1 :]


class Composite(Transformation):
    """The union of several transformations' candidates (each sub-transformation gets its own stream)."""

    def __init__(self, transformations: list[Transformation]) -> None:
        self.transformations = list(transformations)

    def check(self, data_dir: Path | None) -> None:
        for t in self.transformations:
            t.check(data_dir)

    def setup(self, data_dir: Path | None) -> None:
        for t in self.transformations:
            t.setup(data_dir)

    def candidates(self, word: str, rng: np.random.Generator) -> list[str]:
        out: list[str] = []
        streams = rng.spawn(len(self.transformations))
        for t, r in zip(self.transformations, streams):
            for c in t.candidates(word, r):
                if c != word and c not in out:
                    out.append(c)
        return out
