"""Constraints: which word positions may change (pre-transformation) and which substitutes are allowed.

TextFooler's USE sentence-similarity, part-of-speech and embedding-distance constraints are not here:
their models and vectors are not available offline. The counter-fitted neighbour lists already keep
only close neighbours (Alzantot et al.'s set, as used by Jia et al. 2019), so the word-swap attack is
that standard attack surface rather than a full TextFooler reproduction.
"""

from __future__ import annotations

import math
from pathlib import Path

from robustft.robustness.attack.text import AttackedText
from robustft.robustness.common import resolve_resource

# The stop words of the TextFooler public implementation (as in TextAttack's TextFooler recipe) plus
# the GLUE/PTB-tokenized clitics ("'s", "n't", ...) that those files split off as separate words.
TEXTFOOLER_STOPWORDS = frozenset("""
a about above across after afterwards again against ain all almost alone along already also although am
among amongst an and another any anyhow anyone anything anyway anywhere are aren aren't around as at back
been before beforehand behind being below beside besides between beyond both but by can cannot could
couldn couldn't d didn didn't doesn doesn't don don't down due during either else elsewhere empty enough
even ever everyone everything everywhere except first for former formerly from hadn hadn't hasn hasn't
haven haven't he hence her here hereafter hereby herein hereupon hers herself him himself his how however
hundred i if in indeed into is isn isn't it it's its itself just latter latterly least ll may me meanwhile
mightn mightn't mine more moreover most mostly must mustn mustn't my myself namely needn needn't neither
never nevertheless next no nobody none noone nor not nothing now nowhere o of off on once one only onto or
other others otherwise our ours ourselves out over per please s same shan shan't she she's should've
shouldn shouldn't somehow something sometime somewhere such t than that that'll the their theirs them
themselves then thence there thereafter thereby therefore therein thereupon these they this those through
throughout thru thus to too toward towards under unless until up upon used ve was wasn wasn't we were
weren weren't what whatever when whence whenever where whereafter whereas whereby wherein whereupon
wherever whether which while whither who whoever whole whom whose why with within without won won't would
wouldn wouldn't y yet you you'd you'll you're you've your yours yourself yourselves
's 're 've 'd 'll 'm n't ca wo
""".split())


class Constraint:
    """Base: a constraint may restrict positions (`allowed_indices`) and/or substitutes (`allows`)."""

    def check(self, data_dir: Path | None) -> None:
        """Raise UserError when a resource is missing (called before training)."""

    def setup(self, data_dir: Path | None) -> None:
        """Load resources (called once before the first attack)."""

    def allowed_indices(self, text: AttackedText, original: AttackedText) -> set[int] | None:
        """Positions that may be modified; None = no restriction."""
        return None

    def allows(self, original_word: str, candidate: str) -> bool:
        return True


class StopwordModification(Constraint):
    """Never modify a stop word (case-insensitive)."""

    def __init__(self, stopwords: list[str] | None = None) -> None:
        self.stopwords = frozenset(w.lower() for w in stopwords) if stopwords else TEXTFOOLER_STOPWORDS

    def allowed_indices(self, text: AttackedText, original: AttackedText) -> set[int]:
        return {i for i, w in enumerate(original.words.words) if w.lower() not in self.stopwords}


class RepeatModification(Constraint):
    """Never modify a position twice."""

    def allowed_indices(self, text: AttackedText, original: AttackedText) -> set[int]:
        return set(range(len(text.words))) - set(text.modified)


class MaxModificationRate(Constraint):
    """At most ceil(max_rate * n_words) (and at most `max_words`) positions of the attacked field change.

    TextAttack's MaxWordsPerturbed checks this after each swap; as a position filter it is the same for
    word swaps (a swap that would exceed the limit is never generated), and saves the queries.

    `min_words` is TextAttack's `min_threshold` (A2T's recipe: max(ceil(0.1 n), 4) words).
    """

    def __init__(self, max_rate: float | None = 0.3, max_words: int | None = None, min_words: int = 0) -> None:
        if max_rate is not None and not 0 < float(max_rate) <= 1:
            raise ValueError("max_rate must be in (0, 1]")
        self.max_rate = None if max_rate is None else float(max_rate)
        self.max_words = None if max_words is None else int(max_words)
        self.min_words = int(min_words)

    def limit(self, n_words: int) -> int:
        lim = n_words
        if self.max_rate is not None:
            lim = min(lim, max(math.ceil(self.max_rate * n_words), self.min_words))
        if self.max_words is not None:
            lim = min(lim, self.max_words)
        return lim

    def allowed_indices(self, text: AttackedText, original: AttackedText) -> set[int] | None:
        if len(text.modified) >= self.limit(len(original.words)):
            return set()
        return None


class AntonymFilter(Constraint):
    """Reject a substitute that is a listed antonym of the original word (either direction).

    Counter-fitting already pushes antonyms apart, so this rarely fires with the counter-fitted
    neighbours; it guards against label-flipping swaps such as "good" -> "bad" from other candidate sets.
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self.pairs: set[tuple[str, str]] = set()

    def check(self, data_dir: Path | None) -> None:
        for p in self.paths:
            resolve_resource(p, data_dir, "antonym list")

    def setup(self, data_dir: Path | None) -> None:
        if self.pairs:
            return
        for p in self.paths:
            for line in resolve_resource(p, data_dir, "antonym list").read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2:
                    a, b = parts[0].lower(), parts[1].lower()
                    self.pairs.add((a, b))
                    self.pairs.add((b, a))

    def allows(self, original_word: str, candidate: str) -> bool:
        return (original_word.lower(), candidate.lower()) not in self.pairs
