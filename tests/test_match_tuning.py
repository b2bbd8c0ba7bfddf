"""Match-Tuning on tiny random BERT / RoBERTa / DeBERTa-v2 classifiers, and end to end on SST-2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, BertConfig, DebertaV2Config, RobertaConfig

from robustft.cli import CONF_DIR
from robustft.methods.base import TrainContext, instantiate_method, task_loss
from robustft.methods.match_tuning import MatchTuning, match_head, matching, matching_stats
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data

TINY = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            num_labels=2, max_position_embeddings=64, initializer_range=0.2)  # non-degenerate matching
ARCHS = {"bert": BertConfig, "roberta": RobertaConfig, "deberta-v2": DebertaV2Config}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(ARCHS[arch](**TINY), attn_implementation="eager")


def ctx(regression: bool = False) -> TrainContext:
    return TrainContext(task=OmegaConf.create({"is_regression": regression}),
                        trainer=OmegaConf.create({"log_every": 2}), device=torch.device("cpu"), seed=0)


def batch(n: int, length: int = 7, seed: int = 1, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, length), generator=g)
    ids[:, 0] = 2  # a fixed first token, like [CLS]/<s>
    y = torch.tensor(labels) if labels is not None else torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": y}


def method(model, **options) -> MatchTuning:
    """Match-Tuning with conf/method/match_tuning.yaml's options, some overridden, built as the runner builds it."""
    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / "method" / "match_tuning.yaml"), options)
    m = instantiate_method(node, "method")
    assert isinstance(m, MatchTuning)
    m.setup(model, ctx())
    return m


def test_matching_matrix_rows_sum_to_one_and_follow_the_formula():
    z = torch.randn(6, 8)
    m, mixed = matching(z, temperature=0.5)
    assert m.shape == (6, 6) and (m >= 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(6))
    torch.testing.assert_close(m, torch.softmax(z @ z.T / 0.5, -1))
    torch.testing.assert_close(mixed, m @ z)
    # the diagonal takes part: a vector far from the others matches itself
    z[0] = 100 * z[0] / z[0].norm()
    assert matching(z, 1.0)[0][0, 0] > 0.99


def test_matching_stats_on_a_hand_made_matrix():
    m = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    diag, rows, same, n_same, other, n_other = matching_stats(m, torch.tensor([0, 0, 1])).tolist()
    assert (rows, n_same, n_other) == (3, 2, 4)
    assert diag == pytest.approx(1.6)
    assert same == pytest.approx(0.3 + 0.1)  # (0,1) and (1,0)
    assert other == pytest.approx(0.2 + 0.3 + 0.25 + 0.25)
    assert diag + same + other == pytest.approx(rows)  # every row sums to 1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_instance_per_batch_equals_vanilla(arch):
    model = tiny_model(arch)
    mt = method(model, eval_matching=True)
    b = batch(1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(mt.forward(model, b), model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
    model.train()  # same dropout draws in the same order as the HF forward
    torch.manual_seed(3)
    ours = mt.forward(model, b)
    torch.manual_seed(3)
    theirs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(ours, theirs)
    # with more than one instance the matching is active and the logits differ from vanilla
    model.eval()
    b4 = batch(4)
    with torch.no_grad():
        vanilla = model(input_ids=b4["input_ids"], attention_mask=b4["attention_mask"]).logits
        assert (mt.forward(model, b4) - vanilla).abs().max() > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_eval_prediction_does_not_depend_on_the_rest_of_the_batch(arch):
    model = tiny_model(arch).eval()
    x = batch(1, seed=10)
    a, b = batch(3, seed=11), batch(3, seed=12)
    batch_a = {k: torch.cat([x[k], a[k]]) for k in x}
    batch_b = {k: torch.cat([x[k], b[k]]) for k in x}
    off = method(model)  # eval_matching: false (the YAML's)
    pa, pb = off.predict(model, batch_a)[0], off.predict(model, batch_b)[0]
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    torch.testing.assert_close(pa, off.predict(model, x)[0], rtol=0, atol=1e-6)
    on = method(model, eval_matching=True)  # the contrast: matching at eval mixes in the other instances
    assert (on.predict(model, batch_a)[0] - on.predict(model, batch_b)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradient_flows_to_the_projection_and_across_instances(arch):
    model = tiny_model(arch).train()
    mt = method(model)
    head = match_head(model)
    b = batch(4, labels=[0, 1, 0, 1])
    # loss of instance 0 alone: its gradient reaches instance 1's [CLS] vector only through M
    h = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]
    h = h.detach().requires_grad_(True)
    _, mixed = matching(head.dense(head.pre(h)), mt.temperature)
    loss0 = task_loss(head.post(mixed)[:1], b["labels"][:1], False)
    (grad_h,) = torch.autograd.grad(loss0, h)
    assert grad_h[1].abs().sum() > 0
    out = mt.training_step(model, b)
    out.loss.backward()
    for p in (head.dense.weight, head.dense.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_unsupported_architecture_is_a_clear_error():
    from robustft.errors import UserError

    model = torch.nn.Module()
    model.config = SimpleNamespace(model_type="gpt2")
    with pytest.raises(UserError, match="match_tuning supports"):
        match_head(model)


@needs_data()
def test_trains_and_logs_matching_statistics(tmp_path, tiny_overrides):
    metrics = fit(make_cfg([*tiny_overrides, "method=match_tuning", "trainer.epochs=1"]), RunDir(tmp_path))
    assert 0.0 <= metrics["validation/accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for r in train:
        total = r["match/diag"] + r["match/same_label_mass"] + r["match/other_label_mass"]
        assert total == pytest.approx(1.0)  # window means of the row decomposition diag + same + other = 1
        assert 0 < r["match/same_label"] < 1 and 0 < r["match/other_label"] < 1
