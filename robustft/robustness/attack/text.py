"""Word view of a text that round-trips: untouched words keep their exact spelling and spacing.

TextAttack re-joins words with single spaces in places; here a text is kept as alternating separators
and words, so `"".join(pieces)` is always the original string and a swap changes one word only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A word: letters/digits, optionally with inner apostrophes or hyphens ("don't", "well-made"), or a
# GLUE-tokenized clitic ("'s", "n't" is caught by the first branch). Underscores never start or end one.
WORD_RE = re.compile(r"[^\W_](?:[\w'’-]*[^\W_])?|['’][^\W_]+")


@dataclass(frozen=True)
class Words:
    """`pieces` = (sep0, word0, sep1, word1, ..., word_{n-1}, sep_n); separators may be empty."""

    pieces: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Words:
        pieces: list[str] = []
        pos = 0
        for m in WORD_RE.finditer(text):
            pieces.append(text[pos : m.start()])
            pieces.append(m.group())
            pos = m.end()
        pieces.append(text[pos:])
        return cls(tuple(pieces))

    @property
    def words(self) -> tuple[str, ...]:
        return self.pieces[1::2]

    def __len__(self) -> int:
        return len(self.pieces) // 2

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def replace(self, i: int, new: str) -> Words:
        p = list(self.pieces)
        p[2 * i + 1] = new
        return Words(tuple(p))

    def delete(self, i: int) -> Words:
        """Drop word i and merge its two separators (one space survives between two words)."""
        p = list(self.pieces)
        before, after = p[2 * i], p[2 * i + 2]
        if before[-1:].isspace() and after[:1].isspace():
            after = after.lstrip()
        elif not after:  # the last word: drop the gap before it
            before = before.rstrip()
        elif not before:  # the first word: drop the gap after it
            after = after.lstrip()
        merged = before + after
        return Words(tuple(p[: 2 * i] + [merged] + p[2 * i + 3 :]))


def match_case(original: str, candidate: str) -> str:
    """Give a (lower-case) substitute the original's capitalisation: "Good" -> "Nice", "GOOD" -> "NICE".

    TextAttack inserts the neighbour as stored (lower case); keeping the case avoids trivially odd text.
    """
    if original.isupper() and len(original) > 1:
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


@dataclass(frozen=True)
class AttackedText:
    """One example under attack: all text fields, one of which (`target`) is split into words."""

    fields: tuple[str, ...]
    target: int  # index of the attacked field
    words: Words
    modified: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def create(cls, fields: tuple[str, ...], target: int) -> AttackedText:
        return cls(tuple(fields), target, Words.from_text(fields[target]))

    @property
    def inputs(self) -> tuple[str, ...]:
        """The model input: every field, with the attacked one re-joined from its pieces."""
        out = list(self.fields)
        out[self.target] = self.words.text
        return tuple(out)

    def with_word(self, i: int, new: str) -> AttackedText:
        return AttackedText(self.fields, self.target, self.words.replace(i, new), self.modified | {i})

    def without_word(self, i: int) -> AttackedText:
        """For importance ranking only: word indices after i shift, so never search from the result."""
        return AttackedText(self.fields, self.target, self.words.delete(i), self.modified)

    def words_changed(self, original: AttackedText) -> int:
        return sum(a != b for a, b in zip(self.words.words, original.words.words))
