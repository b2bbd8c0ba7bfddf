"""method=ranmask and method=safer: the randomisation (how many positions, which, from which sets), and the ensemble's
prediction = the vote (or mean) of its copies, computed as the official wrappers do (numpy bincount / l2 normalisation), and
scripts/ensemble_stability.py on trained runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robustft.errors import UserError
from robustft.methods.base import TrainContext
from robustft.methods.ranmask import RanMask, maskable, random_mask
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import one_thread, tiny_model  # noqa: F401  (module fixture)

MASK, CLS, SEP, PAD = 4, 2, 3, 0


class Tok:
    """The parts of a tokenizer RanMASK reads."""

    mask_token_id = MASK
    all_special_ids = [PAD, CLS, SEP, MASK]


def method(n: int = 7, how: str = "votes", rate: float = 0.5) -> RanMask:
    m = RanMask("ranmask", mask_rate=rate, min_keep=2, ensemble_size=n, ensemble_method=how, predict_batch_size=2)
    ctx = TrainContext(task=OmegaConf.create({"name": "sst2", "is_regression": False}), trainer=OmegaConf.create({}),
                       device=torch.device("cpu"), seed=11, tokenizer=Tok())
    m.setup(tiny_model("bert"), ctx)
    return m


def pair_batch() -> dict[str, torch.Tensor]:
    """Two pairs [CLS] a [SEP] b [SEP] (+ padding); only b's tokens are maskable."""
    ids = torch.tensor([[CLS, 10, 11, SEP, 20, 21, 22, 23, 24, 25, SEP, PAD],
                        [CLS, 12, SEP, 30, 31, 32, SEP, PAD, PAD, PAD, PAD, PAD]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "token_type_ids": types}


def test_masks_round_n_rate_positions_of_the_last_segment_keeping_min_keep():
    m = method()
    b = pair_batch()
    ok = maskable(b, m.special_ids)
    assert ok.sum(1).tolist() == [6, 3]
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(ok)
    for _ in range(200):
        chosen = random_mask(ok, 0.5, 2, g)
        assert not (chosen & ~ok).any()
        assert chosen.sum(1).tolist() == [3, 1]  # round(6 * .5) = 3; round(3 * .5) = 2 -> 1 to keep 2
        seen |= chosen
    assert torch.equal(seen, ok)  # every maskable position gets masked sometimes
    assert random_mask(ok, 0.9, 2, g).sum(1).tolist() == [4, 1]  # round(5.4) = 5 would keep 1 < 2


@pytest.mark.parametrize("how", ["votes", "mean"])
def test_the_ensemble_prediction_is_the_vote_or_mean_of_its_copies(one_thread, how):  # noqa: F811
    m = method(n=9, how=how)
    model = tiny_model("bert", labels=3).eval()
    model.classifier.weight.data.mul_(30)  # copies disagree: votes are split
    b = pair_batch()
    out = m.predict(model, b)
    copies = m.copies(b, torch.Generator().manual_seed(11))  # the generator predict seeds with the run seed
    assert (copies["input_ids"] == MASK).sum().item() == 9 * (3 + 1)
    logits = model(**copies).logits.detach().numpy().reshape(2, 9, 3)
    if how == "votes":
        expected = np.stack([np.bincount(np.argmax(x, -1), minlength=3) / 9 for x in logits])
        np.testing.assert_allclose(torch.softmax(out, -1).numpy(), expected, atol=1e-6)
        assert out.argmax(-1).tolist() == expected.argmax(-1).tolist()
    else:
        expected = np.stack([(x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0) for x in logits])
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert torch.equal(m.predict(model, b), out)  # seeded per call: a query is repeatable


def test_training_masks_each_example_once_and_bad_options_fail():
    m = method()
    b = {**pair_batch(), "labels": torch.tensor([0, 1])}
    torch.manual_seed(0)
    masked = m.masked(b, None)
    assert (masked["input_ids"] == MASK).sum(1).tolist() == [3, 1]
    assert m.training_step(tiny_model("bert"), b).loss.isfinite()
    assert m.metrics({}) == {"ensemble/size": 7.0}
    for bad in ({"mask_rate": 1.0}, {"ensemble_size": 0}, {"ensemble_method": "max"}):
        opts = {"mask_rate": 0.7, "min_keep": 2, "ensemble_size": 3, "ensemble_method": "votes", "predict_batch_size": 1}
        with pytest.raises(UserError):
            RanMask("ranmask", **{**opts, **bad})


# --- SAFER: the same ensemble over randomly substituted copies ---------------------------------------------------

def safer_setup(n: int = 9, how: str = "votes"):
    import os
    from pathlib import Path

    from robustft.methods.safer import Safer
    from robustft.models import load_model, load_tokenizer

    data = Path(os.environ.get("ROBUSTFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (data / "word_substitution" / "counterfitted_neighbors.json").exists():
        pytest.skip("needs the data bundle's counter-fitted lists")
    conf = Path(__file__).resolve().parent.parent / "robustft" / "conf"
    model_cfg = OmegaConf.load(conf / "model" / "tiny_random.yaml")
    task = OmegaConf.create({"name": "sst2", "text_fields": ["sentence"], "label_names": ["a", "b", "c"],
                             "is_regression": False, "num_labels": 3})
    tok = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = load_model(model_cfg, task).eval()
    m = Safer("safer", path="word_substitution/counterfitted_neighbors.json", ensemble_size=n, ensemble_method=how,
              predict_batch_size=2)
    ctx = TrainContext(task=task, trainer=OmegaConf.create({}), device=torch.device("cpu"), seed=11, tokenizer=tok,
                       data_dir=data)
    m.setup(model, ctx)
    return m, model, tok


def test_safer_substitutes_whole_words_from_their_sets_only(one_thread):  # noqa: F811
    m, _, tok = safer_setup()
    b = dict(tok(["a good movie , terrible acting and goodness"], return_tensors="pt"))
    ids = b["input_ids"][0].tolist()
    seen: dict[int, set[int]] = {i: set() for i in range(len(ids))}
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        for i, v in enumerate(m.randomise(b, g)["input_ids"][0].tolist()):
            seen[i].add(v)
    vocab = tok.get_vocab()
    for i, v in enumerate(ids):
        allowed = set(m.sets[v, : m.sizes[v]].tolist())
        assert seen[i] <= allowed
        token = tok.convert_ids_to_tokens(v)
        if token in ("good", "terrible"):  # whole words with one-token neighbours: drawn from {word} + neighbours
            assert len(seen[i]) > 1 and v in seen[i]
        if token in ("[CLS]", "[SEP]", ","):
            assert seen[i] == {v}
    if "goodness" not in vocab:  # a word split into pieces keeps its first piece
        first = ids.index(vocab["good"], ids.index(vocab["and"]))
        assert seen[first] == {ids[first]}


@pytest.mark.parametrize("how", ["votes", "mean"])
def test_safer_prediction_is_the_vote_or_mean_of_its_copies(one_thread, how):  # noqa: F811
    m, model, tok = safer_setup(how=how)
    model.classifier.weight.data.mul_(30)
    b = dict(tok(["a good movie with great acting", "terrible , bad and awful"], padding=True, return_tensors="pt"))
    out = m.predict(model, b)
    logits = model(**m.copies(b, torch.Generator().manual_seed(11))).logits.detach().numpy().reshape(2, 9, 3)
    if how == "votes":
        expected = np.stack([np.bincount(np.argmax(x, -1), minlength=3) / 9 for x in logits])
        np.testing.assert_allclose(torch.softmax(out, -1).numpy(), expected, atol=1e-6)
    else:
        expected = np.stack([(x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0) for x in logits])
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


@needs_data()
def test_ensemble_stability_script_on_trained_runs(tmp_path, tiny_overrides, capsys):
    """scripts/ensemble_stability.py end to end: a deterministic run (vanilla) keeps every label and scores its
    TextFooler sample as the attack's clean pass did; a ranmask run states its ensemble size; bad input is one line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import ensemble_stability

    over = [o for o in tiny_overrides if not o.startswith("trainer.epochs")]
    over += ["trainer.epochs=1", "robustness=[textfooler]", "robustness.textfooler.num_examples=6"]
    runs = []
    for name, extra in (("vanilla", []), ("ranmask", ["method=ranmask", "method.ensemble_size=3"])):
        cfg = make_cfg([*over, *extra])
        fit(cfg, RunDir(tmp_path / name))
        (tmp_path / name / ".hydra").mkdir()
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")  # as Hydra writes it
        runs.append(str(tmp_path / name))
    assert ensemble_stability.main([*runs, "--repeats", "3", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    samples = [json.loads(x) for x in (tmp_path / "vanilla" / "eval" / "textfooler" / "samples.jsonl").read_text().splitlines()]
    clean = np.mean([s["original_pred"] == s["label"] for s in samples])
    assert out[1] == f"{runs[0]} | 1 | 6 | 0.000 | " + " ".join([f"{clean:.3f}"] * 3)
    assert out[2].startswith(f"{runs[1]} | 3 | 6 | ")
    assert ensemble_stability.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("robustft: error:") and "has no .hydra/config.yaml" in err
