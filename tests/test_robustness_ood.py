"""OOD sets: row counts and label maps (from shared/data/MANIFEST.md), task fit, 3-way <-> 2-way collapse."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
from omegaconf import open_dict

from robustft.errors import UserError
from robustft.robustness.base import EvalContext, build_evaluators
from robustft.robustness.ood import clean_textfooler, read_set
from tests.conftest import DATA_DIR, make_cfg, needs_data
from tests.robustness_stubs import Constant

pytestmark = needs_data()

E, N, C = "entailment", "neutral", "contradiction"
EXPECTED = {  # MANIFEST.md
    "yelp": (1000, {"negative": 518, "positive": 482}),
    "imdb": (1000, {"negative": 497, "positive": 503}),
    "mnli_matched": (9815, {E: 3479, C: 3213, N: 3123}),
    "textfooler_mnli_mismatched": (1000, {E: 346, C: 335, N: 319}),
    "mnli_hard_matched": (4573, None),
    "mnli_hard_mismatched": (4530, None),
    "anli_r1": (1000, {E: 334, N: 333, C: 333}),
    "anli_r2": (1000, {E: 334, N: 333, C: 333}),
    "anli_r3": (1200, {E: 402, N: 402, C: 396}),
}


def ood(overrides=(), task="sst2"):
    cfg = make_cfg([f"task={task}", "robustness=[ood]", *overrides])
    (ev,) = build_evaluators(cfg)
    return cfg, ev


@pytest.mark.parametrize("name", list(EXPECTED))
def test_row_counts_and_label_maps(name):
    _, ev = ood()
    data = read_set(name, ev.catalog[name], DATA_DIR, None)
    n, counts = EXPECTED[name]
    assert len(data.texts) == len(data.labels) == n
    if counts:
        assert Counter(data.labels) == counts
    else:
        assert set(data.labels) == {E, N, C}
    width = 1 if name in ("yelp", "imdb") else 2
    assert all(len(t) == width and all(x.strip() for x in t) for t in data.texts)


def test_textfooler_sentiment_text_is_cleaned():
    _, ev = ood()
    yelp = [t[0] for t in read_set("yelp", ev.catalog["yelp"], DATA_DIR, None).texts]
    imdb = [t[0] for t in read_set("imdb", ev.catalog["imdb"], DATA_DIR, None).texts]
    # 810 Yelp texts start with a CSV quote; 2 remain that open with a real quotation
    assert sum(t.startswith('"') for t in yelp) == 2
    assert not any("\\" in t or '""' in t or "  " in t for t in yelp + imdb)  # no escapes left
    assert clean_textfooler('"great food . \\n\\nthe \\""best\\ "" caf\\u00e9 ."') == 'great food . the "best" café .'
    assert clean_textfooler("plain text") == "plain text"


@pytest.mark.parametrize("task, expected", [
    ("sst2", ["yelp", "imdb"]),
    ("snli", ["mnli_matched", "mnli_hard_matched", "mnli_hard_mismatched", "textfooler_mnli_mismatched",
              "anli_r1", "anli_r2", "anli_r3"]),
    ("mnli", ["mnli_hard_matched", "mnli_hard_mismatched", "textfooler_mnli_mismatched", "anli_r1", "anli_r2",
              "anli_r3"]),  # dev-matched is in-domain for an MNLI model
    ("rte", ["mnli_matched", "mnli_hard_matched", "mnli_hard_mismatched", "textfooler_mnli_mismatched",
             "anli_r1", "anli_r2", "anli_r3"]),  # 3-way sets, gold collapsed to 2-way
])
def test_auto_selects_sets_that_fit(task, expected):
    cfg, ev = ood(task=task)
    assert ev.selected(cfg.task) == expected


def test_sentiment_model_on_yelp(tmp_path):
    cfg, ev = ood(["robustness.ood.sets=[yelp]", "robustness.ood.max_examples=100"])
    metrics, records = ev.evaluate(Constant(0), EvalContext(cfg.task, DATA_DIR, 0))
    assert set(metrics) == {"yelp_accuracy", "yelp_n"} and metrics["yelp_n"] == 100
    assert metrics["yelp_accuracy"] == sum(r["label"] == "negative" for r in records) / 100


def test_two_way_model_on_three_way_set_collapses_gold(tmp_path):
    cfg, ev = ood(["robustness.ood.sets=[anli_r1]"], task="rte")
    metrics, records = ev.evaluate(Constant(1), EvalContext(cfg.task, DATA_DIR, 0))  # not_entailment
    assert metrics["anli_r1_accuracy"] == pytest.approx(666 / 1000)
    assert records[0]["collapsed"] and {r["label"] for r in records} == {E, "not_entailment"}


def test_three_way_model_on_two_way_set_collapses_predictions(tmp_path):
    cfg = make_cfg(["task=snli", "robustness=[ood]"])
    with open_dict(cfg):
        cfg.robustness.ood.catalog.rte_dev = {
            "family": "nli", "reader": "tsv", "file": "glue/RTE/dev.tsv", "columns": ["sentence1", "sentence2"],
            "label_column": "label", "labels": {E: E, "not_entailment": "not_entailment"}}
        cfg.robustness.ood.sets = ["rte_dev"]
    (ev,) = build_evaluators(cfg)
    with open(DATA_DIR / "glue/RTE/dev.tsv", newline="") as f:
        gold = Counter(row["label"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for cls, right in ((1, gold["not_entailment"]), (2, gold["not_entailment"]), (0, gold[E])):
        metrics, records = ev.evaluate(Constant(cls, 3), EvalContext(cfg.task, DATA_DIR, 0))
        assert metrics["rte_dev_accuracy"] == pytest.approx(right / 277)
    assert records[0]["model_pred"] == E


def test_nli_model_on_nli_set_is_direct(tmp_path):
    cfg, ev = ood(["robustness.ood.sets=[anli_r3]"], task="snli")
    metrics, records = ev.evaluate(Constant(2, 3), EvalContext(cfg.task, DATA_DIR, 0))
    assert metrics["anli_r3_accuracy"] == pytest.approx(396 / 1200) and not records[0]["collapsed"]


@pytest.mark.parametrize("task, overrides, message", [
    ("sst2", ["robustness.ood.sets=[anli_r1]"], "does not fit task sst2"),
    ("snli", ["robustness.ood.sets=[yelp]"], "does not fit task snli"),
    ("cola", [], "no set for task cola"),
    ("qnli", [], "no set for task qnli"),
    ("stsb", [], "regression"),
    ("rte", ["robustness.ood.collapse=null", "robustness.ood.sets=[anli_r1]"], "no collapse configured"),
    ("sst2", ["robustness.ood.sets=[amazon]"], "unknown"),
    ("sst2", ["robustness.ood.catalog.yelp.file=ood/nope"], "missing OOD set"),
])
def test_bad_input_is_one_line_error(task, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        ood(overrides, task=task)
    assert "\n" not in str(e.value)


def test_unknown_label_in_file_is_an_error(tmp_path):
    (tmp_path / "ood/textfooler").mkdir(parents=True)
    (tmp_path / "ood/textfooler/yelp").write_text("1 fine\n7 odd\n")
    _, ev = ood()
    with pytest.raises(UserError, match="label '7'"):
        read_set("yelp", ev.catalog["yelp"], tmp_path, None)
