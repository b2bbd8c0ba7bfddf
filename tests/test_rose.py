"""ROSE: mask rule, masked AdamW, first/second/ensemble masks, and composition with Match-Tuning."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, BertConfig

from robustft.cli import CONF_DIR
from robustft.errors import Interrupted, UserError
from robustft.methods.base import TrainContext, instantiate_method, task_loss
from robustft.methods.rose import MaskedAdamW, Rose, is_eligible, quantile_mask, symmetric_kl
from robustft.methods.stats import LogWindow
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data

TRAINER = OmegaConf.create({"log_every": 2, "lr": 1e-3, "weight_decay": 0.01})


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, max_position_embeddings=64, initializer_range=0.2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").train()


def batch(n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def rose_method(group: str = "method", **options) -> Rose:
    """ROSE with conf/method/rose.yaml's options, some overridden, built as the runner builds it."""
    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / "method" / "rose.yaml"), options)
    return instantiate_method(node, group, **({"inner": rose_method()} if group == "selector" else {}))


def rose(model, **options) -> tuple[Rose, MaskedAdamW]:
    r = rose_method(**options)
    ctx = TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=TRAINER,
                       device=torch.device("cpu"), seed=0)
    r.setup(model, ctx)
    return r, r.configure_optimizer(model, TRAINER)


# --- the mask rule ------------------------------------------------------------------------------
def test_quantile_mask_on_hand_made_scores():
    s = torch.arange(10.0)  # quantile(0.7) = 6.3, quantile(0.2) = 1.8 (linear interpolation)
    assert quantile_mask(s, 0, 70).tolist() == [1.0] * 7 + [0.0] * 3
    assert quantile_mask(s, 20, 70).tolist() == [0.0] * 2 + [1.0] * 5 + [0.0] * 3
    assert quantile_mask(s, 0, 100).tolist() == [1.0] * 10
    shuffled = torch.tensor([9.0, 0.0, 7.0, 3.0])  # order does not matter; q70 = 7.6 -> only 9 is cut
    assert quantile_mask(shuffled, 0, 70).tolist() == [0.0, 1.0, 1.0, 1.0]
    ties = torch.tensor([1.0, 1.0, 1.0, 5.0])  # q70 = 1 + 0.1 * 4 = 1.4: the three ties stay
    assert quantile_mask(ties, 0, 70).tolist() == [1.0, 1.0, 1.0, 0.0]


def test_default_eligibility_is_the_official_layer_and_weight_rule():
    yes = ["bert.encoder.layer.0.attention.self.query.weight", "roberta.encoder.layer.11.output.LayerNorm.weight"]
    no = ["bert.encoder.layer.0.attention.self.query.bias", "bert.embeddings.word_embeddings.weight",
          "bert.embeddings.LayerNorm.weight", "bert.pooler.dense.weight", "classifier.weight",
          "classifier.out_proj.weight"]
    assert all(is_eligible(n, ["layer", "weight"], []) for n in yes)
    assert not any(is_eligible(n, ["layer", "weight"], []) for n in no)
    assert not is_eligible(yes[1], ["layer", "weight"], ["LayerNorm"])
    r, opt = rose(tiny_bert(), eligible={"contains": ["layer", "weight"], "excludes": ["LayerNorm"]})
    assert r.eligible_names and all("LayerNorm" not in n and ".layer." in n for n in r.eligible_names)


# --- masked AdamW -------------------------------------------------------------------------------
def params3(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]


def set_grads(ps, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("kernel", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_all_ones_masked_adamw_equals_torch_adamw(kernel):
    a, b = params3(), params3()
    ours = MaskedAdamW([{"params": a, "weight_decay": 0.1}], eligible=a[:2], lr=1e-2, betas=(0.9, 0.98), **kernel)
    ref = torch.optim.AdamW([{"params": b, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.98), **kernel)
    for step in range(4):
        set_grads(a, step)
        set_grads(b, step)
        ours.set_mask(torch.ones(2))
        ours.step()
        ref.step()
    for pa, pb in zip(a, b):  # the same kernel: bit for bit
        assert torch.equal(pa, pb)
        assert torch.equal(ours.state[pa]["exp_avg_sq"], ref.state[pb]["exp_avg_sq"])


def test_frozen_tensors_do_not_move_and_keep_momentum():
    ps = params3()
    opt = MaskedAdamW([{"params": ps, "weight_decay": 0.1}], eligible=ps[:2], lr=1e-2, betas=(0.9, 0.98))
    set_grads(ps, 0)
    opt.step()  # all ones: builds momentum everywhere
    before = [p.detach().clone() for p in ps]
    m1 = [opt.state[p]["exp_avg"].clone() for p in ps]
    v1 = [opt.state[p]["exp_avg_sq"].clone() for p in ps]
    set_grads(ps, 1)
    grads = [p.grad.clone() for p in ps]
    opt.set_mask(torch.tensor([0.0, 0.5]))  # ps[0] frozen, ps[1] half, ps[2] ineligible (always updates)
    opt.step()
    frozen = ps[0]
    assert torch.equal(frozen, before[0])  # no Adam update and no weight decay
    assert torch.equal(opt.state[frozen]["exp_avg"], m1[0])  # momentum kept
    torch.testing.assert_close(opt.state[frozen]["exp_avg_sq"], 0.98 * v1[0] + 0.02 * m1[0] ** 2)  # fed with g' = m
    assert opt.state[frozen]["step"] == 2
    assert not torch.equal(ps[2], before[2])
    # m = 0.5 follows the official formula: g' = m g + (1 - m) exp_avg; update and decay scaled by m
    g = 0.5 * grads[1] + 0.5 * m1[1]
    m, v = 0.9 * m1[1] + 0.1 * g, 0.98 * v1[1] + 0.02 * g * g
    lr = 1e-2 * 0.5
    expected = before[1] * (1 - lr * 0.1) - lr / (1 - 0.9**2) * m / ((v / (1 - 0.98**2)).sqrt() + 1e-8)
    torch.testing.assert_close(ps[1].detach(), expected)
    torch.testing.assert_close(opt.state[ps[1]]["exp_avg"], m)


# --- masks of the three variants ----------------------------------------------------------------
def test_first_order_kl_is_not_in_the_loss():
    model = tiny_bert()
    r, _ = rose(model, variant="first")
    b = batch()
    torch.manual_seed(5)
    out = r.training_step(model, b)
    assert all(p.grad is None for p in model.parameters())  # the KL backward never touched .grad
    torch.manual_seed(5)  # the same two dropout draws
    l1 = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    l2 = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert not torch.equal(l1, l2)  # dropout made the two passes differ, so the KL is not zero
    ce = 0.5 * (task_loss(l1, b["labels"], False) + task_loss(l2, b["labels"], False))
    assert torch.equal(out.loss, ce)
    # the scores are the KL gradient norms of the eligible tensors
    kl_grads = torch.autograd.grad(symmetric_kl(l1, l2, False), r.eligible, retain_graph=True, materialize_grads=True)
    torch.testing.assert_close(r._kl_scores, torch.stack([g.norm() for g in kl_grads]))
    params = list(model.parameters())
    expected = torch.autograd.grad(ce, params, allow_unused=True)
    out.loss.backward()
    for p, e in zip(params, expected):
        if e is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, e)  # the CE gradient only


def one_step(r: Rose, opt: MaskedAdamW, model, seed: int) -> dict:
    out = r.training_step(model, batch(seed=seed))
    out.loss.backward()
    masks = r.masks(opt)
    r.optimizer_step(opt, model)
    opt.zero_grad(set_to_none=True)
    return masks


def test_second_order_mask_uses_the_first_moment_before_the_step():
    model = tiny_bert()
    r, opt = rose(model, variant="second", upper=60)
    assert one_step(r, opt, model, 1)["final"] is None  # first step: no moment yet -> all ones
    r.training_step(model, batch(seed=2)).loss.backward()
    g = torch.stack([p.grad.norm() for p in r.eligible])
    h = torch.stack([opt.state[p]["exp_avg"].norm() for p in r.eligible])
    expected = quantile_mask(((1 - 0.9) * g / h - 1).abs(), 0, 60)
    assert torch.equal(r.masks(opt)["final"], expected)
    assert 0 < expected.sum() < len(expected)


def test_ensemble_mask_values():
    model = tiny_bert()
    r, opt = rose(model, variant="ensemble", gamma=0.5)
    first_step = one_step(r, opt, model, 1)  # second-order is all ones on the first step
    assert set(first_step["final"].tolist()) == {0.5, 1.0}
    masks = one_step(r, opt, model, 2)
    assert set(masks["final"].tolist()) <= {0.0, 0.5, 1.0}
    torch.testing.assert_close(masks["final"], 0.5 * masks["first"] + 0.5 * masks["second"])


def test_log_window_means_since_the_last_train_row():
    w = LogWindow(log_every=2)
    w.add(torch.tensor([1.0]))
    assert w.flush() == [1.0]  # step 1: not a logging step, keeps accumulating
    w.add(torch.tensor([3.0]))
    assert w.flush() == [4.0]  # step 2: a logging step (rows at 2, 4, ...), then restarts
    w.add(torch.tensor([5.0]))
    assert w.flush() == [5.0]


def test_rose_around_rose_is_refused():
    with pytest.raises(UserError, match="already the method"):
        rose_method("selector")


# --- end to end -----------------------------------------------------------------------------------
@needs_data()
def test_match_tuning_with_rose_trains_and_resumes_exactly(tmp_path, tiny_overrides):
    over = [*tiny_overrides, "trainer.epochs=1", "method=match_tuning", "selector=rose", "selector.variant=ensemble"]
    cfg = make_cfg(over)
    assert cfg.selector.upper == 70.0 and cfg.selector.eligible.contains == ["layer", "weight"]
    full = fit(cfg, RunDir(tmp_path / "full"))
    assert 0.0 <= full["validation/accuracy"] <= 1.0 and full["train/steps"] == 8
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    for r in train:  # both methods' statistics land in the train rows
        assert "match/diag" in r and 0 < r["rose/updated_frac"] <= 1 and r["rose/mask_mean"] <= r["rose/updated_frac"]
    assert any(r["rose/mask_mean"] < 1 for r in train)  # the selection froze something
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "+trainer.interrupt_at_step=3"]), RunDir(tmp_path / "cut"))
    resumed = fit(make_cfg(over), RunDir(tmp_path / "cut"))
    assert resumed["validation/loss"] == full["validation/loss"]
    rows_cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    stats = [{k: v for k, v in r.items() if k.startswith(("match/", "rose/"))} for r in train]
    stats_cut = [{k: v for k, v in r.items() if k.startswith(("match/", "rose/"))}
                 for r in rows_cut if r["split"] == "train" and r["step"] > 3]
    assert stats_cut == stats[1:]  # rows after the cut (steps 4, 6, 8): the windows resume exactly


@needs_data()
def test_bench_methods_script_runs_every_arm(tmp_path, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_methods.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: scripts/ is on sys.path
    spec = importlib.util.spec_from_file_location("bench_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--model", "tiny_random", "--batch-size", "4", "--max-length", "32", "--steps", "1", "--repeats", "1",
                "--warmup", "0", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["arm"] for r in results] == list(bench.ARMS)
    assert all(r["median_s"] > 0 and r["ratio"] > 0 for r in results)
    assert "rose_first" in capsys.readouterr().out
