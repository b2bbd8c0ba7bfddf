"""AdvGLUE: official scoring on hand-computed cases, the loader, task fit and bad input."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from robustft.errors import UserError
from robustft.robustness.advglue import AdvGLUE, advglue_scores
from robustft.robustness.base import EvalContext, build_evaluators
from tests.conftest import DATA_DIR, make_cfg, needs_data
from tests.robustness_stubs import BagOfWords, Constant


def test_official_scoring_hand_computed():
    out = advglue_scores({
        "sst2": ([1, 0, 1, 1], [1, 0, 0, 1]),            # acc 3/4
        "qqp": ([1, 1, 0, 0], [1, 0, 0, 1]),             # acc 1/2; tp 1, fp 1, fn 1 -> F1 1/2; score 1/2
        "mnli": ([0, 1, 2], [0, 1, 1]),                  # acc 2/3
        "mnli-mm": ([2, 2, 0, 1], [2, 0, 0, 0]),         # acc 1/2 -> mnli score (2/3 + 1/2) / 2 = 7/12
    })
    assert out["sst2_accuracy"] == 0.75 and out["sst2_score"] == 0.75
    assert out["qqp_accuracy"] == 0.5 and out["qqp_f1"] == 0.5 and out["qqp_score"] == 0.5
    assert out["mnli_accuracy"] == pytest.approx(2 / 3) and out["mnli-mm_accuracy"] == 0.5
    assert out["mnli_score"] == pytest.approx(7 / 12) and "mnli-mm_score" not in out
    assert out["overall"] == pytest.approx((0.75 + 0.5 + 7 / 12) / 3)
    assert out["accuracy"] == pytest.approx((3 + 2 + 2 + 2) / 15)  # plain, pooled over all examples
    assert out["n"] == 15


def test_qqp_score_is_mean_of_accuracy_and_f1():
    out = advglue_scores({"qqp": ([1, 1, 1, 0, 0], [1, 1, 0, 0, 1])})  # acc 3/5; tp 2 fp 1 fn 1 -> F1 2/3
    assert out["qqp_f1"] == pytest.approx(2 / 3)
    assert out["qqp_score"] == pytest.approx((3 / 5 + 2 / 3) / 2) == out["overall"]
    assert advglue_scores({"qqp": ([0, 0], [0, 0])})["qqp_f1"] == 0.0  # no positives at all


@needs_data()
def test_local_file_row_and_label_counts():
    data = json.loads((DATA_DIR / "advglue/dev.json").read_text())
    ev = AdvGLUE()
    expected = {"sst2": (148, {1: 76, 0: 72}), "qqp": (78, {0: 46, 1: 32}), "mnli": (121, {2: 50, 1: 39, 0: 32}),
                "mnli-mm": (162, {0: 60, 2: 57, 1: 45}), "qnli": (148, {0: 74, 1: 74}), "rte": (81, {1: 46, 0: 35})}
    for subset, (n, counts) in expected.items():
        rows = ev.load(subset, DATA_DIR)
        assert len(rows) == n == len(data[subset])
        assert Counter(r["label"] for r in rows) == counts


@needs_data()
def test_sst2_model_scored_on_sst2_subset(tmp_path):
    cfg = make_cfg(["robustness=[advglue]"])
    (ev,) = build_evaluators(cfg)
    metrics, records = ev.evaluate(Constant(1), EvalContext(cfg.task, DATA_DIR, 0))
    assert metrics["sst2_accuracy"] == pytest.approx(76 / 148) == metrics["overall"] == metrics["accuracy"]
    assert len(records) == 148 and records[0]["label"] in ("negative", "positive")
    assert sum(r["correct"] for r in records) == 76


@needs_data()
def test_mnli_model_gets_matched_and_mismatched(tmp_path):
    cfg = make_cfg(["task=mnli", "robustness=[advglue]"])
    (ev,) = build_evaluators(cfg)
    metrics, records = ev.evaluate(Constant(2, 3), EvalContext(cfg.task, DATA_DIR, 0))
    assert metrics["mnli_accuracy"] == pytest.approx(50 / 121)
    assert metrics["mnli-mm_accuracy"] == pytest.approx(57 / 162)
    assert metrics["mnli_score"] == pytest.approx((50 / 121 + 57 / 162) / 2) == metrics["overall"]
    assert metrics["n"] == 283 and {r["subset"] for r in records} == {"mnli", "mnli-mm"}


@needs_data()
def test_pairs_are_fed_in_task_field_order(tmp_path):
    cfg = make_cfg(["task=rte", "robustness=[advglue]"])
    (ev,) = build_evaluators(cfg)
    seen = []

    class Spy(BagOfWords):
        def logits(self, texts):
            seen.extend(texts)
            return super().logits(texts)

    ev.evaluate(Spy({}, [0.0, 1.0]), EvalContext(cfg.task, DATA_DIR, 0))
    rows = json.loads((DATA_DIR / "advglue/dev.json").read_text())["rte"]
    assert seen[0] == (rows[0]["sentence1"], rows[0]["sentence2"]) and len(seen) == 81


@needs_data()
def test_snli_model_may_use_mnli_subsets_explicitly(tmp_path):
    cfg = make_cfg(["task=snli", "robustness=[advglue]", "robustness.advglue.subsets=[mnli,mnli-mm]"])
    (ev,) = build_evaluators(cfg)
    assert ev.subsets_for(cfg.task) == ["mnli", "mnli-mm"]
    metrics, _ = ev.evaluate(Constant(0, 3), EvalContext(cfg.task, DATA_DIR, 0))
    assert metrics["mnli_accuracy"] == pytest.approx(32 / 121)


@needs_data()
@pytest.mark.parametrize("overrides, message", [
    (["task=cola", "robustness=[advglue]"], "no subset for task cola"),
    (["task=snli", "robustness=[advglue]"], "no subset for task snli"),
    (["task=stsb", "robustness=[advglue]"], "regression"),
    (["robustness=[advglue]", "robustness.advglue.subsets=[rte]"], "does not fit task sst2"),
    (["robustness=[advglue]", "robustness.advglue.subsets=[sst3]"], "unknown"),
    (["robustness=[advglue]", "robustness.advglue.path=advglue/missing.json"], "missing AdvGLUE file"),
])
def test_bad_input_is_one_line_error(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        build_evaluators(make_cfg(overrides))
    assert "\n" not in str(e.value)


def test_labels_outside_task_are_rejected(tmp_path):
    bad = tmp_path / "advglue" / "dev.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"sst2": [{"idx": 0, "label": 2, "sentence": "x"}]}))
    cfg = make_cfg(["robustness=[advglue]"])
    ev = AdvGLUE()
    with pytest.raises(UserError, match="outside"):
        ev.evaluate(Constant(1), EvalContext(cfg.task, tmp_path, 0))
    assert np.isnan(advglue_scores({})["overall"])
