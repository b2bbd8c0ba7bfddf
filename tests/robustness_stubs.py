"""Stand-ins for robustft.predict.Predictor with known behaviour, so attack tests need no transformer."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

TOKEN = re.compile(r"[\w']+")


class BagOfWords:
    """logits = bias + sum of per-word weight vectors over every field (lower-cased word lookup).

    `calls` holds the batch size of every forward call; `queries` counts texts, like Predictor.
    """

    unk_token = "[UNK]"

    def __init__(self, weights: Mapping[str, Sequence[float]], bias: Sequence[float]) -> None:
        self.weights = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.bias = np.asarray(bias, dtype=np.float64)
        self.calls: list[int] = []
        self.queries = 0

    def _one(self, fields: tuple[str, ...]) -> np.ndarray:
        out = self.bias.copy()
        for text in fields:
            for w in TOKEN.findall(text.lower()):
                if w in self.weights:
                    out = out + self.weights[w]
        return out

    def logits(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        self.calls.append(len(texts))
        self.queries += len(texts)
        return np.array([self._one(t) for t in texts]).reshape(len(texts), len(self.bias))

    def probs(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        z = self.logits(texts)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def keyword_model(word: str = "good", strength: float = 4.0) -> BagOfWords:
    """Binary sentiment that only knows one word: positive iff `word` is present."""
    return BagOfWords({word: [0.0, strength]}, bias=[strength / 2, 0.0])


class Constant(BagOfWords):
    """Always the same class, whatever the text (an attack can never succeed on the other class)."""

    def __init__(self, cls: int = 1, num_labels: int = 2) -> None:
        bias = [0.0] * num_labels
        bias[cls] = 5.0
        super().__init__({}, bias)
