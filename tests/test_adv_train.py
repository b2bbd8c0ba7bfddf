"""method=adv_train (A2T): the generated adversarial examples satisfy the attack's constraints and were made in
eval mode, the loss equals TextAttack's `Trainer.training_step` written out, and the adversarial set is resume
state. Tiny random BERT with MiniLM's tokenizer; the counter-fitted lists of the data bundle."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from omegaconf import OmegaConf

from robustft.methods.adv_train import AdvTrain, word_spans
from robustft.methods.base import TrainContext, instantiate_method
from robustft.robustness.attack.constraints import TEXTFOOLER_STOPWORDS
from robustft.robustness.attack.text import Words
from robustft.robustness.attack.transformations import load_table
from tests.tiny_models import one_thread, tiny_sst2  # noqa: F401  (module fixture)

CONF = Path(__file__).resolve().parent.parent / "robustft" / "conf"
DATA = Path(os.environ.get("ROBUSTFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
TABLE = DATA / "word_substitution" / "counterfitted_neighbors.json"
pytestmark = pytest.mark.skipif(not TABLE.exists(), reason="needs the data bundle's counter-fitted lists")

SENTENCES = ["a good and funny movie with great actors", "the film is boring , slow and terrible",
             "an excellent story told with warm humor", "bad acting and a weak plot ruin it",
             "a charming , clever and beautiful picture", "this dull mess is awful to watch",
             "the director gives us a fresh and smart comedy", "a sad , stupid and tiresome film",
             "wonderful performances make this one memorable", "the script is poor and the jokes fail",
             "a brilliant , moving drama", "an ugly , clumsy and noisy sequel"]


def setup_method(**overrides) -> tuple[AdvTrain, torch.nn.Module, Dataset]:
    node = OmegaConf.load(CONF / "method" / "adv_train.yaml")
    for k, v in overrides.items():
        OmegaConf.update(node, k, v)
    method = instantiate_method(node, "method")
    model, tok, task = tiny_sst2()
    trainer = OmegaConf.create({"max_length": 64, "eval_batch_size": 32})
    ctx = TrainContext(task=task, trainer=trainer, device=torch.device("cpu"), seed=3, tokenizer=tok, data_dir=DATA)
    model = method.setup(model, ctx)
    with torch.no_grad():  # labels = the model's predictions, so every example is attacked (none skipped)
        enc = tok(SENTENCES, padding=True, return_tensors="pt")
        model.eval()
        # a random model scores every sentence alike: sharpen the head and centre the margins, so a
        # word swap can move some sentence across the decision boundary
        model.classifier.weight.mul_(50.0)
        margin = model(**enc).logits.diff(dim=-1).squeeze(-1)
        model.classifier.bias[1] -= margin.median()
        preds = model(**enc).logits.argmax(-1).tolist()
        model.train()
    train = Dataset.from_dict({"idx": list(range(100, 100 + len(SENTENCES))), "sentence": SENTENCES, "label": preds})
    method.train_data(train, ctx)
    return method, model, train


def batch_of(method: AdvTrain, train: Dataset, rows: list[int]) -> dict[str, torch.Tensor]:
    tok = method.ctx.tokenizer
    batch = dict(tok([train[r]["sentence"] for r in rows], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([train[r]["label"] for r in rows])
    batch["idx"] = torch.tensor([train[r]["idx"] for r in rows])
    return batch


def test_adversarial_examples_satisfy_the_constraints_and_are_made_in_eval_mode(one_thread):  # noqa: F811
    method, model, train = setup_method(share=1.0, **{"attack.goal.query_budget": None})
    model.config.hidden_dropout_prob = 0.1
    for m in model.modules():  # dropout on: a train-mode generation would not be repeatable
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    idx = train["idx"]
    pool = method.generate(model, idx)
    assert model.training and method.modes == {False}  # every query and the gradient pass in eval mode
    assert method.generate(model, idx) == pool  # eval mode: no dropout, the same examples again
    assert pool, "the tiny model resisted every attack; the constraints were not exercised"
    table = load_table(str(TABLE))
    originals = {r["idx"]: r for r in train}
    for p in pool:
        (text,) = p["fields"]
        new = Words.from_text(text).words
        old = Words.from_text(originals[p["idx"]]["sentence"]).words
        assert len(old) == len(new) and p["label"] == originals[p["idx"]]["label"]
        changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert 1 <= len(changed) <= max(math.ceil(0.1 * len(old)), 4)
        for i in changed:
            assert old[i].lower() not in TEXTFOOLER_STOPWORDS
            assert new[i].lower() in table[old[i].lower()]
    assert method.cost["queries"] > 0 and method.cost["grad_tokens"] > 0


def test_word_spans_cover_the_attack_words():
    text = "it's a well-made , funny film"
    assert [text[a:b] for a, b in word_spans(text)] == list(Words.from_text(text).words)


def official_training_step(model, tok, clean: list[tuple[str, int]], adv: list[tuple[str, int]], alpha: float):
    """TextAttack `Trainer.training_step` on a batch holding clean and adversarial rows (`is_adv_sample`):
    CrossEntropyLoss(reduction="none"), sample_weights = 1, alpha on adversarial rows, loss = mean(loss * w)."""
    rows = clean + adv
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    logits = model(**enc).logits
    loss = F.cross_entropy(logits, torch.tensor([y for _, y in rows]), reduction="none")
    weights = torch.ones(len(rows))
    weights[len(clean):] *= alpha
    return torch.mean(loss * weights)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_loss_is_textattacks_weighted_mean_over_clean_and_adversarial_rows(one_thread, alpha):  # noqa: F811
    method, model, train = setup_method(alpha=alpha, clean_batches=100)  # no generation: the pool is set
    model.eval()  # no dropout, so both sides see the same network
    ref = copy.deepcopy(model)
    method.pool = [{"fields": ["a fine , comic film"], "label": 1, "idx": 100},
                   {"fields": ["the picture is dreary"], "label": 0, "idx": 101},
                   {"fields": ["an exquisite tale with hearty humour and more words"], "label": 0, "idx": 102}]
    rows = [0, 1, 2, 3, 4]
    out = method.training_step(model, batch_of(method, train, rows))
    out.loss.backward()
    expected = official_training_step(ref, method.ctx.tokenizer, [(train[r]["sentence"], train[r]["label"]) for r in rows],
                                      [(p["fields"][0], p["label"]) for p in method.pool], alpha)
    expected.backward()
    assert abs(out.loss.item() - expected.item()) < 1e-6
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())
               if p.grad is not None)
    assert diff < 1e-6


def test_the_adversarial_set_is_resume_state(one_thread):  # noqa: F811
    method, model, train = setup_method(share=0.5, every_steps=2)
    batches = [batch_of(method, train, r) for r in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11])]
    first = method.training_step(model, batches[0])
    state = json.loads(json.dumps(method.state_dict()))  # the checkpoint stores it as JSON
    assert state["calls"] == 1 and state["ranks"][0]["pool"] == method.pool and method.pool
    resumed, _, _ = setup_method(share=0.5, every_steps=2)
    resumed.load_state_dict(state)
    fresh, _, _ = setup_method(share=0.5, every_steps=2)  # no state: would generate again at its first step
    for k, b in enumerate(batches[1:]):
        torch.manual_seed(k)  # the same dropout masks for both
        a = method.training_step(model, b)
        torch.manual_seed(k)
        r = resumed.training_step(model, b)
        assert a.loss.item() == r.loss.item() and method.pool == resumed.pool
    assert method.cost == resumed.cost and first.loss.isfinite()
    cost = resumed.metrics({"cost/train_flops": 1.0})
    assert cost["cost/adv_generation_queries"] == method.cost["queries"] > 0
    assert cost["cost/total_flops"] == 1.0 + cost["cost/adv_generation_flops"] + cost["cost/adv_train_flops"]
    fresh.training_step(model, batches[1])
    assert fresh.cost["attacked"] > 0  # the continuation above reused the stored set instead


def test_bad_options_are_user_errors():
    from robustft.errors import UserError

    for bad in ({"share": 0.0}, {"every_steps": 0}, {"alpha": -1.0}):
        with pytest.raises(UserError):
            setup_method(**bad)


def test_generation_bench_runs_both_ways_on_the_same_examples():
    """scripts/bench_adv_gen.py on a tiny model: both generations make the same queries and adversarial texts."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_adv_gen.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny_random", "--examples", "4", "--pad-to", "64",
                          "--data-dir", str(DATA)], capture_output=True, text=True, timeout=300, check=True).stdout
    fast, slow = [line for line in out.splitlines() if " queries, " in line]
    assert fast.split(" s, ")[1].split(" queries")[0] == slow.split(" s, ")[1].split(" queries")[0]
    assert "same adversarial texts: True" in out and "ratio TextAttack-style / robustft:" in out
