"""The attack framework on stub models with known behaviour (no transformer needed)."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from robustft.errors import UserError
from robustft.robustness.attack.attack import SKIPPED, SUCCEEDED, Attack, AttackResult, attack_metrics
from robustft.robustness.attack.constraints import (
    AntonymFilter,
    MaxModificationRate,
    RepeatModification,
    StopwordModification,
)
from robustft.robustness.attack.goal import UntargetedClassification
from robustft.robustness.attack.search import GreedyWordSwapWIR
from robustft.robustness.attack.text import AttackedText, Words
from robustft.robustness.attack.transformations import (
    CharDelete,
    CharInsert,
    CharSubstitute,
    CharSwap,
    Composite,
    WordSwapNeighbors,
)
from robustft.robustness.base import EvalContext, build_evaluators
from tests.conftest import DATA_DIR, make_cfg, needs_data
from tests.robustness_stubs import BagOfWords, Constant, keyword_model

WIR = ["delete", "unk", "weighted-saliency", "random"]


@pytest.fixture
def neighbours(tmp_path):
    path = tmp_path / "neighbours.json"
    path.write_text(json.dumps({
        "good": ["fine", "decent"], "great": ["grand"], "movie": ["film", "picture"], "plot": ["story"],
        "really": ["truly"], "not": ["never"], "cat": ["kitty"], "dog": ["puppy"],
    }))
    return path


def word_attack(path, wir="delete", budget=None, constraints=None) -> Attack:
    t = WordSwapNeighbors(str(path))
    cons = constraints if constraints is not None else [RepeatModification(), StopwordModification(), MaxModificationRate(0.5)]
    a = Attack(UntargetedClassification(budget), t, cons, GreedyWordSwapWIR(wir))
    a.setup(None)
    return a


def char_attack(budget=None) -> Attack:
    t = Composite([CharSwap(), CharSubstitute(), CharDelete(), CharInsert()])
    return Attack(UntargetedClassification(budget), t, [RepeatModification(), StopwordModification()],
                  GreedyWordSwapWIR("unk"))


# ------------------------------------------------------------------------------------------ words


@pytest.mark.parametrize("text", [
    "it 's a charming and often affecting journey . ", "  Leading and trailing  ", "", "...", "don't stop-me now!",
    "ca n't   wo n't", "Tab\tseparated\nlines", "naïve café — ok", "x", "_under_score_ 3.5 kg",
])
def test_words_round_trip(text):
    w = Words.from_text(text)
    assert w.text == text
    if len(w):
        i = len(w) // 2
        swapped = w.replace(i, "ZZ")
        assert swapped.text.replace("ZZ", w.words[i], 1) == text  # only that word changes
        assert len(w.delete(i)) == len(w) - 1


@needs_data()
def test_words_round_trip_on_real_dev_sets():
    lines = (DATA_DIR / "glue/SST-2/dev.tsv").read_text().splitlines()[1:]
    lines += (DATA_DIR / "ood/textfooler/mnli_mismatched").read_text().splitlines()[:300]
    for line in lines:
        for field in line.split("\t"):
            assert Words.from_text(field).text == field
    assert Words.from_text("it 's not ca n't").words == ("it", "'s", "not", "ca", "n't")


def test_delete_merges_spaces():
    assert Words.from_text("a good movie").delete(1).text == "a movie"
    assert Words.from_text("a good movie .").delete(2).text == "a good ."
    assert Words.from_text("good movie").delete(1).text == "good"


# ------------------------------------------------------------------------------------------ word swaps


@pytest.mark.parametrize("wir", WIR)
def test_keyword_model_is_flipped_by_substituting_the_keyword(neighbours, wir):
    model = keyword_model("good")
    r = word_attack(neighbours, wir).attack(model, ["A good movie with a plot."], 1, 0, seed=0, key=0)
    assert r.status == SUCCEEDED
    assert r.perturbed.inputs[0] in ("A fine movie with a plot.", "A decent movie with a plot.")
    assert r.words_changed == 1 and r.original_pred == 1 and r.perturbed_pred == 0
    assert r.queries == model.queries


def test_each_position_is_one_batched_call(neighbours):
    model = keyword_model("good")
    # "movie" is ranked last by deletion (it does not matter); "good" first -> 3 calls in all
    r = word_attack(neighbours, "delete").attack(model, ["movie really good"], 1, 0)
    assert r.status == SUCCEEDED
    assert model.calls == [1, 3, 2]  # clean input; 3 deletions in one call; both candidates of "good" in one


@pytest.mark.parametrize("wir", WIR)
def test_attacking_many_side_by_side_equals_one_at_a_time(neighbours, wir):
    texts = ["A good movie.", "good plot , great cat", "a dull dog", "really good", "the movie was good good"]
    examples = [([t], 1, k) for k, t in enumerate(texts)]
    attack = word_attack(neighbours, wir, budget=9)
    model = keyword_model("good", strength=1.5)
    merged = attack.attack_many(model, examples, 0, seed=5, concurrency=3)
    merged_calls = len(model.calls)
    single = [attack.attack(model, f, y, 0, seed=5, key=k) for f, y, k in examples]
    assert [(r.status, r.perturbed.inputs, r.queries) for r in merged] == \
        [(r.status, r.perturbed.inputs, r.queries) for r in single]
    assert merged_calls < len(model.calls) - merged_calls  # fewer, larger model calls


def test_stop_words_are_never_modified(neighbours):
    model = BagOfWords({"not": [3.0, 0.0]}, bias=[0.0, 1.0])  # negative iff "not" is present
    r = word_attack(neighbours).attack(model, ["not a cat"], 0, 0)
    assert r.status == "failed" and "not" in r.perturbed.inputs[0]


@pytest.mark.parametrize("wir", WIR)
def test_query_budget_is_respected(neighbours, wir):
    model = Constant(1)
    text = "good great movie plot really cat dog good great movie plot"
    r = word_attack(neighbours, wir, budget=7, constraints=[RepeatModification()]).attack(model, [text], 1, 0)
    assert r.status == "failed"
    assert r.queries <= 7 and model.queries <= 7


def test_budget_of_one_only_scores_the_clean_input(neighbours):
    r = word_attack(neighbours, budget=1).attack(keyword_model(), ["a good movie"], 1, 0)
    assert r.status == "failed" and r.queries == 1


def test_max_modification_rate_limits_swaps(neighbours):
    # Positive unless both "good" and "great" are gone: two swaps are needed.
    model = BagOfWords({"good": [0.0, 2.0], "great": [0.0, 2.0]}, bias=[1.0, 0.0])
    text = ["good great cat dog"]  # 4 words: 0.25 -> 1 swap allowed, 0.5 -> 2
    cons = [RepeatModification(), StopwordModification()]
    tight = word_attack(neighbours, constraints=[*cons, MaxModificationRate(0.25)]).attack(model, text, 1, 0)
    assert tight.status == "failed" and tight.words_changed == 1
    loose = word_attack(neighbours, constraints=[*cons, MaxModificationRate(0.5)]).attack(model, text, 1, 0)
    assert loose.status == SUCCEEDED and loose.words_changed == 2


def test_antonym_filter_rejects_antonyms(tmp_path):
    table = tmp_path / "n.json"
    table.write_text(json.dumps({"good": ["bad"]}))
    antonyms = tmp_path / "antonyms.txt"
    antonyms.write_text("bad good \nfoo bar")
    model = keyword_model("good")
    plain = word_attack(table, constraints=[]).attack(model, ["good"], 1, 0)
    assert plain.status == SUCCEEDED
    guarded = word_attack(table, constraints=[AntonymFilter([str(antonyms)])])
    guarded.setup(None)
    assert guarded.attack(model, ["good"], 1, 0).status == "failed"


def test_case_is_kept(neighbours):
    r = word_attack(neighbours).attack(keyword_model(), ["Good movie"], 1, 0)
    assert r.perturbed.inputs[0] in ("Fine movie", "Decent movie")


def test_misclassified_input_is_skipped(neighbours):
    r = word_attack(neighbours).attack(keyword_model(), ["a dull movie"], 1, 0)
    assert r.status == SKIPPED and r.queries == 1


@pytest.mark.parametrize("target", [1, 0])
def test_pairs_attack_only_the_chosen_field(neighbours, target):
    model = BagOfWords({"cat": [0.0, 1.5], "dog": [0.0, 1.5]}, bias=[2.0, 0.0])  # class 1 needs both words
    pair = ["the cat sat", "a dog ran"]
    r = word_attack(neighbours).attack(model, pair, 1, target)
    assert r.status == SUCCEEDED
    assert r.perturbed.inputs[1 - target] == pair[1 - target]
    assert r.perturbed.inputs[target] != pair[target]


# ------------------------------------------------------------------------------------------ characters


def test_char_attack_flips_keyword_model_deterministically():
    runs = [char_attack().attack(keyword_model("good"), ["a good movie"], 1, 0, seed=3, key=11) for _ in range(2)]
    assert runs[0].status == SUCCEEDED
    assert runs[0].perturbed.inputs == runs[1].perturbed.inputs and runs[0].queries == runs[1].queries
    changed = runs[0].perturbed.inputs[0].split()[1]
    assert changed != "good" and abs(len(changed) - 4) <= 1


def test_char_edits_are_single_edits():
    import numpy as np

    for cls, delta in ((CharSwap, 0), (CharDelete, -1), (CharInsert, 1), (CharSubstitute, 0)):
        for seed in range(20):
            (c,) = cls().candidates("attack", np.random.default_rng(seed))
            assert len(c) == 6 + delta and c != "attack"
            if cls is CharSwap:
                assert sorted(c) == sorted("attack")
    assert CharDelete().candidates("a", np.random.default_rng(0)) == []


def test_char_attack_budget():
    r = char_attack(budget=5).attack(Constant(0), ["lots of words here to try and change"], 0, 0)
    assert r.queries <= 5 and r.status == "failed"


# ------------------------------------------------------------------------------------------ metrics


def _result(status, changed=0, n_words=4, queries=1) -> AttackResult:
    text = AttackedText.create(tuple([" ".join(["w"] * n_words)]), 0)
    return AttackResult(status, text, text, 1, 1, 0, queries, changed)


def test_attack_metrics_hand_computed():
    results = [_result("skipped", queries=1), _result("succeeded", 1, 4, 5), _result("succeeded", 2, 10, 7),
               _result("failed", 0, 6, 9)]
    m = attack_metrics(results)
    assert m["n"] == 4
    assert m["clean_acc"] == 0.75
    assert m["acc_under_attack"] == 0.25
    assert m["attack_success_rate"] == pytest.approx(2 / 3)
    assert m["avg_perturbed_words_pct"] == pytest.approx((25 + 20) / 2)
    assert m["avg_queries"] == pytest.approx(7.0)


# ------------------------------------------------------------------------------------------ evaluators


@needs_data()
@pytest.mark.parametrize("name", ["textfooler", "pwws", "typo"])
def test_yaml_compositions_run_on_real_dev(tmp_path, name):
    cfg = make_cfg([f"robustness=[{name}]", f"robustness.{name}.num_examples=6"])
    (ev,) = build_evaluators(cfg)
    assert ev.name == name
    model = BagOfWords({"good": [0, 3], "bad": [3, 0], "fun": [0, 3], "dull": [3, 0]}, bias=[0.1, 0])
    metrics, records = ev.evaluate(model, EvalContext(cfg.task, DATA_DIR, 0))
    assert metrics["n"] == 6 and len(records) == 6
    for key in ("clean_acc", "acc_under_attack", "attack_success_rate", "avg_perturbed_words_pct", "avg_queries"):
        assert key in metrics
    assert metrics["acc_under_attack"] <= metrics["clean_acc"]
    assert {r["status"] for r in records} <= {"succeeded", "failed", "skipped"}
    again, _ = build_evaluators(cfg)[0].evaluate(model, EvalContext(cfg.task, DATA_DIR, 0))
    assert {k: v for k, v in again.items() if not k.endswith("_per_s")} == \
        pytest.approx({k: v for k, v in metrics.items() if not k.endswith("_per_s")}, nan_ok=True)


@needs_data()
def test_attack_on_nli_pairs_defaults_to_hypothesis(tmp_path):
    cfg = make_cfg(["task=rte", "robustness=[textfooler]", "robustness.textfooler.num_examples=4"])
    (ev,) = build_evaluators(cfg)
    model = BagOfWords({"not": [0, 2]}, bias=[0.5, 0])
    _, records = ev.evaluate(model, EvalContext(cfg.task, DATA_DIR, 0))
    for r in records:
        assert r["attacked_field"] == "sentence2"
        assert r["perturbed"]["sentence1"] == r["original"]["sentence1"]


@needs_data()
@pytest.mark.parametrize("overrides, message", [
    (["task=stsb", "robustness=[textfooler]"], "regression"),
    (["robustness=[textfooler]", "robustness.textfooler.attack_field=premise"], "not a text field"),
    (["robustness=[textfooler]", "robustness.textfooler.transformation.path=nowhere/n.json"], "missing"),
    (["robustness=[textfooler]", "robustness.textfooler.num_examples=0"], "positive"),
    (["robustness=[typo]", "robustness.typo.split=test"], "no such split"),
])
def test_bad_attack_config_is_one_line_error(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        build_evaluators(make_cfg(overrides))
    assert "\n" not in str(e.value)


def test_unknown_evaluator_fails_in_preflight(capsys):
    from robustft.cli import preflight

    with pytest.raises(SystemExit):
        preflight(["robustness=[advglue,nope]"])
    err = capsys.readouterr().err
    assert "unknown robustness 'nope'" in err and err.count("\n") == 1


def test_composition_object():
    ev = instantiate({"_target_": "robustft.robustness.attack.AttackEvaluator",
                      "goal": {"_target_": "robustft.robustness.attack.goal.UntargetedClassification"},
                      "transformation": {"_target_": "robustft.robustness.attack.transformations.CharSwap"},
                      "constraints": [], "search": {"_target_": "robustft.robustness.attack.search.GreedyWordSwapWIR"}})
    assert isinstance(ev.attack.transformation, CharSwap) and ev.attack.constraints == []
