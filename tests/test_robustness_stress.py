"""Training-time stresses produce exactly the requested ratios, sizes and flip counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from robustft.data import load_task
from robustft.errors import UserError
from robustft.stress import apply_stress, parse_ratio
from tests.conftest import make_cfg, needs_data


class FakeRun:
    def __init__(self) -> None:
        self.info: dict = {}

    def update(self, **fields) -> None:
        self.info.update(fields)


def toy(counts: dict[int, int]) -> DatasetDict:
    labels = [c for c, n in counts.items() for _ in range(n)]
    rng = np.random.default_rng(0)
    labels = [labels[i] for i in rng.permutation(len(labels))]
    train = Dataset.from_dict({"idx": list(range(len(labels))), "sentence": [f"s{i}" for i in range(len(labels))],
                               "label": labels})
    return DatasetDict({"train": train, "validation": train.select(range(5))})


def stressed(overrides, counts, task="sst2", run=None):
    cfg = make_cfg([f"task={task}", *overrides])
    data, report = apply_stress(toy(counts), cfg)
    if run is not None:
        run.info["stress"] = report
    return data["train"]


def test_none_is_a_no_op():
    data = toy({0: 10, 1: 20})
    out, report = apply_stress(data, make_cfg([]))
    assert out is data and report is None


@pytest.mark.parametrize("ratio, expected", [("1:10", {0: 40, 1: 400}), (0.1, {0: 40, 1: 400}),
                                             ("1:3", {0: 133, 1: 399}), ("0.25", {0: 100, 1: 400}),
                                             (1, {0: 305, 1: 305})])
def test_imbalance_ratio_is_exact(ratio, expected):
    # the smaller class (0) becomes the minority; sizes p*k : q*k for the largest k the data allows
    train = stressed(["stress=imbalance", f"stress.imbalance.ratio='{ratio}'"], {0: 305, 1: 400})
    assert dict(Counter(train["label"])) == expected


def test_imbalance_of_a_chosen_minority_in_three_classes():
    train = stressed(["stress=imbalance", "stress.imbalance.ratio='1:4'", "stress.imbalance.minority=[neutral]"],
                     {0: 100, 1: 90, 2: 130}, task="snli")
    assert dict(Counter(train["label"])) == {0: 100, 1: 25, 2: 100}  # majority classes cut to the same size


def test_low_resource_is_stratified_and_exact():
    train = stressed(["stress=low_resource", "stress.low_resource.n=101"], {0: 300, 1: 700})
    assert len(train) == 101
    assert dict(Counter(train["label"])) == {0: 30, 1: 71}  # 30.3 / 70.7 -> largest remainder gives 71


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.35])
def test_uniform_noise_flips_exact_counts(rate):
    run = FakeRun()
    train = stressed(["stress=label_noise", f"stress.label_noise.rate={rate}"], {0: 200, 1: 301}, run=run)
    clean, noisy = np.array(train["clean_label"]), np.array(train["label"])
    for c, n in ((0, 200), (1, 301)):
        assert int(((clean == c) & (noisy != c)).sum()) == int(np.floor(rate * n + 0.5))
    assert run.info["stress"]["label_noise"]["n_flipped"] == int((clean != noisy).sum())


def test_uniform_noise_spreads_over_other_classes():
    train = stressed(["stress=label_noise", "stress.label_noise.rate=0.3"], {0: 100, 1: 100, 2: 100}, task="snli")
    clean, noisy = np.array(train["clean_label"]), np.array(train["label"])
    for c in range(3):
        flipped = Counter(noisy[(clean == c) & (noisy != c)].tolist())
        assert sum(flipped.values()) == 30 and sorted(flipped.values()) == [15, 15]


def test_class_conditional_noise():
    over = ["stress=label_noise", "stress.label_noise.mode=class_conditional",
            "stress.label_noise.transitions={positive: {negative: 0.25}}"]
    train = stressed(over, {0: 200, 1: 400})
    clean, noisy = np.array(train["clean_label"]), np.array(train["label"])
    assert int(((clean == 1) & (noisy == 0)).sum()) == 100
    assert int(((clean == 0) & (noisy != 0)).sum()) == 0


def test_combined_order_seeded_and_recorded():
    over = ["stress=imbalance", "stress.imbalance.ratio='1:4'", "stress.low_resource.n=100",
            "stress.label_noise.rate=0.1"]
    run = FakeRun()
    a = stressed(over, {0: 300, 1: 500}, run=run)
    b = stressed(over, {0: 300, 1: 500})
    c = stressed([*over, "seed=7"], {0: 300, 1: 500})
    assert a["idx"] == b["idx"] and a["label"] == b["label"]
    assert a["idx"] != c["idx"]
    assert dict(Counter(a["clean_label"])) == {0: 20, 1: 80}  # 1:4 kept through the stratified subsample
    info = run.info["stress"]
    assert info["n_before"] == 800 and info["n_after"] == 100 and info["imbalance"]["ratio"] == "1:4"
    assert info["label_noise"]["n_flipped"] == 2 + 8
    assert info["counts_before"] == {"negative": 300, "positive": 500}


def test_validation_split_is_untouched():
    data = toy({0: 50, 1: 50})
    out, _ = apply_stress(data, make_cfg(["stress=label_noise"]))
    assert out["validation"]["label"] == data["validation"]["label"]


@pytest.mark.parametrize("overrides, message", [
    (["stress=imbalance", "stress.imbalance.ratio=2"], "must be in"),
    (["stress=imbalance", "stress.imbalance.ratio='a:b'"], "not a ratio"),
    (["stress=imbalance", "stress.imbalance.minority=[neutral]"], "not a class"),
    (["stress=low_resource", "stress.low_resource.n=5000"], "must be in 1..100"),
    (["stress=label_noise", "stress.label_noise.mode=odd"], "uniform or class_conditional"),
    (["stress=label_noise", "stress.label_noise.mode=class_conditional"], "needs transitions"),
    (["stress=label_noise", "stress.label_noise.rate=1.5"], "must be in"),
])
def test_bad_stress_config_is_one_line_error(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        stressed(overrides, {0: 50, 1: 50})
    assert "\n" not in str(e.value)


def test_parse_ratio():
    assert parse_ratio("1:10") == parse_ratio(0.1) == parse_ratio("0.1")


@needs_data()
def test_real_sst2_slice():
    cfg = make_cfg(["stress=imbalance", "stress.imbalance.ratio='1:5'", "task.max_train_samples=1200"])
    data = load_task(cfg.task, cfg.data_dir, int(cfg.seed))
    counts = Counter(apply_stress(data, cfg)[0]["train"]["label"])
    assert counts[1] == 5 * counts[0] and counts[0] > 0
