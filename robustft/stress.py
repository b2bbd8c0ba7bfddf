"""Training-time stresses: class imbalance, low-resource subsampling and label noise on the train split.

Applied by the runner right after the data is loaded (so they work with every method), in a fixed
order: imbalance -> low_resource -> label_noise. Each is seeded and exact: the requested ratio, size
and flip counts are met exactly (up to the rounding stated per stress), never just in expectation.
What was done is recorded in run_info.json under `stress`; the config sits in .hydra/config.yaml, so
sweeps can group by `stress.name`, `stress.imbalance.ratio`, ... (scripts/aggregate.py --group-by).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError
from robustft.validate import parse_ratio

_STAGES = {"imbalance": 1, "low_resource": 2, "label_noise": 3}


def class_ids(value: Any, label_names: Sequence[str], key: str) -> list[int]:
    """Class names or ids from config -> ids."""
    values = [value] if isinstance(value, (str, int)) else list(value)
    out = []
    for v in values:
        if str(v) in label_names:
            out.append(list(label_names).index(str(v)))
        elif str(v).isdigit() and int(v) < len(label_names):
            out.append(int(v))
        else:
            raise UserError(f"{key}={v!r} is not a class of this task {list(label_names)}; use a class name")
    return out


def _take(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    return np.sort(rng.choice(pool, size=k, replace=False)) if k < len(pool) else pool


def imbalance(labels: np.ndarray, ratio: Fraction, minority: list[int], rng: np.random.Generator) -> np.ndarray:
    """Rows to keep so that every minority class has exactly ratio x the size of every majority class.

    With ratio = p/q the sizes are p*k and q*k for the largest k the data allows, so the ratio is exact;
    every majority class is cut to the same size q*k (classes other than the minority ones are majority).
    """
    classes = sorted(set(labels.tolist()))
    majority = [c for c in classes if c not in minority]
    if not majority:
        raise UserError("stress.imbalance.minority names every class; leave at least one majority class")
    counts = {c: int((labels == c).sum()) for c in classes}
    p, q = ratio.numerator, ratio.denominator
    k = min([counts.get(c, 0) // p for c in minority] + [counts[c] // q for c in majority])
    if k == 0:
        raise UserError(f"too few training examples for imbalance {p}:{q} (class counts {counts}); "
                        "use more data or a milder ratio")
    keep = [_take(rng, np.flatnonzero(labels == c), (p if c in minority else q) * k) for c in classes]
    return np.sort(np.concatenate(keep))


def stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly n rows; per-class counts proportional to the class sizes (largest remainder, ties by id)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(int)
    rest = n - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), i))
    for i in order[:rest]:
        take[i] += 1
    keep = [_take(rng, np.flatnonzero(labels == c), int(t)) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(keep))


def low_resource_rows(labels: np.ndarray, n: int, seed: int, regression: bool) -> np.ndarray:
    """The n rows `stress=low_resource` keeps (stratified for classification), seeded by the run seed.

    Public so that a method subsampling its own training set (weight_mixup's train_size) picks exactly
    the rows the stress would.
    """
    rng = np.random.default_rng([seed, _STAGES["low_resource"]])
    return np.sort(rng.choice(len(labels), size=n, replace=False)) if regression else stratified(labels, n, rng)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))  # half up: 0.5 -> 1, unlike Python's banker's rounding


def label_noise(labels: np.ndarray, num_classes: int, transitions: Mapping[int, Mapping[int, float]],
                rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """Flip exactly round(rate * n_from) labels per (from, to) pair; the rows are drawn without overlap."""
    noisy = labels.copy()
    flips: dict[str, int] = {}
    for src in range(num_classes):
        targets = transitions.get(src, {})
        if not targets:
            continue
        if sum(targets.values()) > 1 + 1e-9:
            raise UserError(f"stress.label_noise: the flip rates out of class {src} sum to more than 1")
        pool = rng.permutation(np.flatnonzero(labels == src))
        start = 0
        for dst, rate in sorted(targets.items()):
            k = _round(rate * len(pool))
            rows = pool[start : start + k]
            noisy[rows] = dst
            start += k
            flips[f"{src}->{dst}"] = int(len(rows))
    return noisy, flips


def uniform_transitions(labels: np.ndarray, num_classes: int, rate: float,
                        rng: np.random.Generator) -> dict[int, dict[int, float]]:
    """Uniform (symmetric) noise: round(rate * n_c) flips per class, spread evenly over the other classes.

    The per-class total is exact; when it does not divide evenly, the remainder goes to randomly chosen
    target classes. Returned as rates so `label_noise` does the flipping.
    """
    out: dict[int, dict[int, float]] = {}
    for src in range(num_classes):
        n = int((labels == src).sum())
        total = _round(rate * n)
        others = [c for c in range(num_classes) if c != src]
        if not n or not total or not others:
            continue
        base, extra = divmod(total, len(others))
        bonus = set(rng.choice(others, size=extra, replace=False).tolist()) if extra else set()
        # as rates k / n, which label_noise turns back into exactly k flips
        out[src] = {dst: (base + (dst in bonus)) / n for dst in others}
    return out


def apply_stress(data: DatasetDict, cfg: DictConfig) -> tuple[DatasetDict, dict[str, Any] | None]:
    """Apply cfg.stress to data["train"]; returns the data and a report of what was done (for run_info.json).

    A no-op (report None) without a train split or with stress=none.
    """
    stress = cfg.get("stress")
    if stress is None or "train" not in data:
        return data, None
    s = OmegaConf.to_container(stress, resolve=True)
    imb, low, noise = s.get("imbalance") or {}, s.get("low_resource") or {}, s.get("label_noise") or {}
    active = bool(imb.get("ratio")) or bool(low.get("n")) or bool(noise.get("rate")) or bool(noise.get("transitions"))
    if not active:
        return data, None
    task = cfg.task
    seed = int(s["seed"]) if s.get("seed") is not None else int(cfg.seed)
    names = [str(n) for n in task.label_names]
    train: Dataset = data["train"]
    labels = np.asarray(train["label"])
    report: dict[str, Any] = {"name": s.get("name"), "seed": seed, "n_before": len(train),
                              "counts_before": _counts(labels, names, task)}
    regression = bool(task.is_regression)

    if imb.get("ratio"):
        if regression:
            raise UserError(f"stress.imbalance needs a classification task; {task.name} is regression")
        ratio = parse_ratio(imb["ratio"])
        minority = minority_classes(imb, labels, names)
        keep = imbalance(labels, ratio, minority, np.random.default_rng([seed, _STAGES["imbalance"]]))
        train, labels = train.select(keep), labels[keep]
        report["imbalance"] = {"ratio": f"{ratio.numerator}:{ratio.denominator}",
                               "minority": [names[c] for c in minority]}

    if low.get("n"):
        n = int(low["n"])
        if not 0 < n <= len(train):
            raise UserError(f"stress.low_resource.n={n} must be in 1..{len(train)} (the training examples left); "
                            "lower it or raise task.max_train_samples")
        keep = low_resource_rows(labels, n, seed, regression)
        train, labels = train.select(keep), labels[keep]
        report["low_resource"] = {"n": n, "stratified": not regression}

    if noise.get("rate") or noise.get("transitions"):
        if regression:
            raise UserError(f"stress.label_noise needs a classification task; {task.name} is regression")
        rng = np.random.default_rng([seed, _STAGES["label_noise"]])
        mode = str(noise.get("mode", "uniform"))
        transitions = noise_transitions(noise, mode, labels, names, rng)
        noisy, flips = label_noise(labels, len(names), transitions, rng)
        train = train.add_column("clean_label", labels.tolist()) if "clean_label" not in train.column_names else train
        train = train.remove_columns("label").add_column("label", noisy.tolist())
        n_flipped = int((noisy != labels).sum())
        report["label_noise"] = {"mode": mode, "flips": {_flip_name(k, names): v for k, v in flips.items()},
                                 "n_flipped": n_flipped, "rate": n_flipped / len(labels) if len(labels) else 0.0}
        labels = noisy

    report.update(n_after=len(train), counts_after=_counts(labels, names, task))
    out = DatasetDict(dict(data))
    out["train"] = train
    return out, report


def minority_classes(imb: dict[str, Any], labels: np.ndarray, names: list[str]) -> list[int]:
    """`stress.imbalance.minority` as class ids; by default the smallest class (lowest id on ties)."""
    if imb.get("minority") is not None:
        return class_ids(imb["minority"], names, "stress.imbalance.minority")
    present, counts = np.unique(labels, return_counts=True)
    return [int(present[np.argmin(counts)])]


def noise_transitions(noise: dict[str, Any], mode: str, labels: np.ndarray, names: list[str],
                      rng: np.random.Generator) -> dict[int, dict[int, float]]:
    """The (from -> to) flip rates of `stress.label_noise`: uniform over the other classes, or as given."""
    if mode == "uniform":
        rate = float(noise.get("rate") or 0.0)
        if not 0 <= rate <= 1:
            raise UserError(f"stress.label_noise.rate={rate} must be in [0, 1]")
        return uniform_transitions(labels, len(names), rate, rng)
    if mode != "class_conditional":
        raise UserError(f"stress.label_noise.mode={mode}; use uniform or class_conditional")
    raw = noise.get("transitions")
    if not raw:
        raise UserError("stress.label_noise.mode=class_conditional needs transitions, e.g. "
                        "'stress.label_noise.transitions={positive: {negative: 0.3}}'")
    transitions: dict[int, dict[int, float]] = {}
    for src, row in raw.items():
        (s_id,) = class_ids(src, names, "stress.label_noise.transitions")
        transitions[s_id] = {class_ids(d, names, "stress.label_noise.transitions")[0]: float(r) for d, r in row.items()}
        if s_id in transitions[s_id]:
            raise UserError(f"stress.label_noise.transitions maps {src} to itself; list other classes only")
    return transitions


def _counts(labels: np.ndarray, names: list[str], task: DictConfig) -> dict[str, int]:
    if bool(task.is_regression):
        return {}
    return {n: int((labels == i).sum()) for i, n in enumerate(names)}


def _flip_name(key: str, names: list[str]) -> str:
    a, b = key.split("->")
    return f"{names[int(a)]}->{names[int(b)]}"
