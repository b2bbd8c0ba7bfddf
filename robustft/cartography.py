"""Dataset cartography: training-dynamics statistics and data selection (Swayamdipta et al., 2020).

Reads the per-epoch files that `trainer.record_dynamics=true` writes (allenai/cartography's format:
`training_dynamics/dynamics_epoch_{e}.jsonl`, rows `{"guid", "logits_epoch_{e}", "gold"}`) and computes,
per training example, over the epochs e = 1..E of the reference run:

- confidence    mean_e p_e(gold), the softmax probability of the gold label;
- variability   std_e p_e(gold) with **ddof=0** (population std, `np.std`), as allenai/cartography's
                `compute_train_dy_metrics`. The official FTFT code uses `torch.std`, i.e. ddof=1; set
                `ddof=1` to match it. With the same E for every example the two differ by the constant
                factor sqrt(E / (E - 1)), so selections (rankings) are identical either way;
- correctness   number of epochs whose argmax prediction is the gold label (an integer 0..E, as
                cartography; the data map colours by correctness / E);
- forgetfulness number of correct -> incorrect transitions between consecutive epochs (Toneva et al.,
                2019); 1000 when the example is never predicted correctly, as cartography;
- threshold_closeness  confidence x (1 - confidence) (cartography's active-bias baseline).

Selection (`select`) keeps exactly k = floor(fraction x N) examples (FTFT's `int(N * rate)` for random;
its other rules keep `score > quantile(score, 1 - rate)`, which drops ties at the threshold; cartography
keeps `head(k + 1)`, an off-by-one not reproduced here):

- ambiguous      highest variability;
- hard_to_learn  lowest confidence;
- easy_to_learn  highest confidence (accepted but crashing in the official FTFT code);
- random         a seeded uniform sample (needs no reference run).

Ties are broken by ascending guid, so a selection is a pure function of the statistics (and the seed).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RULES = ("ambiguous", "hard_to_learn", "easy_to_learn", "random")
NEVER_LEARNED = 1000  # cartography's forgetfulness of an example never predicted correctly
STATS_FILE = "td_metrics.jsonl"  # cartography's name for the per-example statistics
_EPOCH_FILE = re.compile(r"^dynamics_epoch_(\d+)\.jsonl$")


class DynamicsError(ValueError):
    """Dynamics files missing, incomplete or inconsistent."""


@dataclass
class Dynamics:
    """Logits of N examples over E epochs: guid (N,), gold (N,), logits (N, E, C); sorted by guid."""

    guid: np.ndarray
    gold: np.ndarray
    logits: np.ndarray

    @property
    def num_epochs(self) -> int:
        return int(self.logits.shape[1])


@dataclass
class Stats:
    """Per-example statistics, aligned with `guid` (sorted ascending)."""

    guid: np.ndarray
    gold: np.ndarray
    confidence: np.ndarray
    variability: np.ndarray
    correctness: np.ndarray
    forgetfulness: np.ndarray
    threshold_closeness: np.ndarray
    num_epochs: int

    def __len__(self) -> int:
        return len(self.guid)

    def rows(self) -> list[dict]:
        """Records with cartography's td_metrics.jsonl columns."""
        return [
            {"guid": int(g), "index": i, "threshold_closeness": float(t), "confidence": float(c),
             "variability": float(v), "correctness": int(k), "forgetfulness": int(f)}
            for i, (g, t, c, v, k, f) in enumerate(zip(self.guid, self.threshold_closeness, self.confidence,
                                                      self.variability, self.correctness, self.forgetfulness))
        ]


def dynamics_folder(path: str | Path) -> Path:
    """A run directory or its training_dynamics/ folder -> the folder holding the epoch files."""
    path = Path(path)
    return path if path.name == "training_dynamics" or not (path / "training_dynamics").is_dir() \
        else path / "training_dynamics"


def epoch_files(path: str | Path) -> list[Path]:
    """dynamics_epoch_0.jsonl, dynamics_epoch_1.jsonl, ... (consecutive from 0; gaps are an error)."""
    folder = dynamics_folder(path)
    found = {int(m.group(1)): folder / name for name in (p.name for p in folder.glob("dynamics_epoch_*.jsonl"))
             if (m := _EPOCH_FILE.match(name))}
    epochs = sorted(found)
    if epochs != list(range(len(epochs))):
        raise DynamicsError(f"{folder}: dynamics epochs {epochs} are not consecutive from 0")
    return [found[e] for e in epochs]


def read_dynamics(path: str | Path, burn_out: int | None = None) -> Dynamics:
    """Read the epoch files of a run (the first `burn_out` epochs if given) into arrays.

    Every epoch must hold the same examples with the same gold labels (as cartography asserts).
    """
    files = epoch_files(path)
    if burn_out:
        files = files[: int(burn_out)]
    if not files:
        raise DynamicsError(f"no dynamics_epoch_*.jsonl under {dynamics_folder(path)}; "
                            "train with trainer.record_dynamics=true for at least one full epoch")
    guid_ref: np.ndarray | None = None
    gold_ref: np.ndarray | None = None
    per_epoch = []
    for epoch, file in enumerate(files):
        key = f"logits_epoch_{epoch}"
        guids, golds, logits = [], [], []
        with open(file) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    guids.append(row["guid"])
                    golds.append(row["gold"])
                    logits.append(row[key])
        guid = np.asarray(guids, dtype=np.int64)
        order = np.argsort(guid, kind="stable")
        guid, gold = guid[order], np.asarray(golds, dtype=np.int64)[order]
        if len(np.unique(guid)) != len(guid):
            raise DynamicsError(f"{file}: duplicate guids")
        if guid_ref is None:
            guid_ref, gold_ref = guid, gold
        elif not (np.array_equal(guid, guid_ref) and np.array_equal(gold, gold_ref)):
            raise DynamicsError(f"{file}: examples or gold labels differ from epoch 0")
        per_epoch.append(np.asarray(logits, dtype=np.float64)[order])
    return Dynamics(guid=guid_ref, gold=gold_ref, logits=np.stack(per_epoch, axis=1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def compute_stats(dyn: Dynamics, ddof: int = 0) -> Stats:
    """Confidence, variability (std with `ddof`, default 0 as cartography), correctness, forgetfulness."""
    n, epochs, _ = dyn.logits.shape
    if ddof >= epochs:
        raise DynamicsError(f"variability with ddof={ddof} needs more than {ddof} epochs, found {epochs}")
    probs = softmax(dyn.logits)  # (N, E, C)
    p_gold = probs[np.arange(n), :, dyn.gold]  # (N, E)
    correct = dyn.logits.argmax(axis=-1) == dyn.gold[:, None]  # (N, E); first max wins, as np.argmax
    confidence = p_gold.mean(axis=1)
    forgot = (correct[:, :-1] & ~correct[:, 1:]).sum(axis=1)
    return Stats(
        guid=dyn.guid,
        gold=dyn.gold,
        confidence=confidence,
        variability=p_gold.std(axis=1, ddof=ddof),
        correctness=correct.sum(axis=1).astype(np.int64),
        forgetfulness=np.where(correct.any(axis=1), forgot, NEVER_LEARNED).astype(np.int64),
        threshold_closeness=confidence * (1 - confidence),
        num_epochs=epochs,
    )


def num_selected(fraction: float, n: int) -> int:
    """floor(fraction x n) (robust to float error: 0.29 x 100 -> 29), at least 1 when fraction > 0."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    return min(n, max(1, math.floor(fraction * n + 1e-9))) if n else 0


def select(stats: Stats | None, rule: str, fraction: float = 0.33, seed: int = 0,
           guids: np.ndarray | None = None) -> np.ndarray:
    """The guids (sorted ascending) that `rule` keeps; `random` needs only `guids` (or stats.guid)."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule '{rule}'; choose one of {', '.join(RULES)}")
    if rule == "random":
        pool = np.sort(np.asarray(stats.guid if guids is None else guids, dtype=np.int64))
        k = num_selected(fraction, len(pool))
        return np.sort(np.random.default_rng([seed, 6]).permutation(pool)[:k])
    if stats is None:
        raise ValueError(f"rule '{rule}' needs training-dynamics statistics")
    key = {"ambiguous": -stats.variability, "hard_to_learn": stats.confidence,
           "easy_to_learn": -stats.confidence}[rule]
    order = np.lexsort((stats.guid, key))  # by key, then by guid
    return np.sort(stats.guid[order[: num_selected(fraction, len(stats))]])
