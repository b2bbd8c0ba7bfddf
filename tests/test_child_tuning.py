"""Child-Tuning: F's random mask (density, 1/p scaling), D's Fisher mask (top fraction, the Fisher
estimate itself, computed once across a resume), and the selector composing with methods in real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

import robustft.methods.child_tuning as ct
from robustft.errors import Interrupted, UserError
from robustft.methods.base import TrainContext, task_loss
from robustft.methods.child_tuning import ChildTuning, fisher_information, top_fraction_mask
from robustft.methods.vanilla import Vanilla
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import one_thread  # noqa: F401  (module fixture)
from tests.tiny_models import tiny_model as tiny

RULE = {"contains": ["layer"], "excludes": []}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch: str = "bert", seed: int = 0) -> nn.Module:
    return tiny(arch, hidden=16, intermediate=32, seed=seed)






def batch(n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def child(model: nn.Module, variant: str, reserve_p: float = 0.3, rule=None) -> tuple[ChildTuning, torch.optim.Optimizer]:
    trainer = OmegaConf.create({"log_every": 1, "lr": 1e-3, "weight_decay": 0.01})
    method = ChildTuning(name="child_tuning", variant=variant, reserve_p=reserve_p, eligible=rule or RULE,
                         inner=Vanilla(name="vanilla"))
    method.setup(model, TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=trainer,
                                     device=torch.device("cpu"), seed=0))
    return method, method.configure_optimizer(model, trainer)


def backward(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    b = batch(seed=seed)
    task_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], False).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# --- F: a fresh Bernoulli mask scaled by 1 / p ---------------------------------------------------
def test_f_keeps_about_p_of_the_entries_scaled_by_exactly_one_over_p():
    model = tiny_model()
    method, opt = child(model, "f", reserve_p=0.3)
    before = backward(model)
    logs = method.optimizer_step(opt, model)  # the step leaves the masked gradients in p.grad
    masks = dict(zip(method.names, method._views))  # this step's draw
    assert masks and all(".layer." in n for n in masks)
    scale = torch.ones(()) / 0.3  # official: grad * (mask / reserve_p)
    kept = total = 0
    for n, p in model.named_parameters():
        if n not in masks:  # embeddings, pooler, classifier: untouched
            assert torch.equal(p.grad, before[n]), n
            continue
        on = masks[n] != 0
        assert torch.equal(masks[n][on], scale.expand(int(on.sum())))
        assert torch.equal(p.grad[on], before[n][on] * scale), n
        assert not p.grad[~on].any(), n
        kept, total = kept + int(on.sum()), total + p.numel()
    density = kept / total  # ~5k entries: sd of the density ~0.0065
    assert abs(density - 0.3) < 0.03
    assert logs["child/mask_density"] == pytest.approx(density, abs=1e-12)


def test_f_draws_a_fresh_mask_every_step_from_the_global_rng():
    model = tiny_model()
    method, _ = child(model, "f")
    torch.manual_seed(3)
    first = [m.clone() for m in method.step_masks()]
    second = [m.clone() for m in method.step_masks()]
    torch.manual_seed(3)
    again = method.step_masks()
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the global RNG: a resume redraws the same


# --- D: the Fisher mask -----------------------------------------------------------------------------
def test_top_fraction_mask_by_hand():
    scores = [torch.tensor([[0.1, 0.5], [0.9, 0.3]]), torch.tensor([0.7, 0.2, 0.8, 0.4, 0.6, 0.0])]
    # 10 values 0.0..0.9; keep 30%: 0.7, 0.8, 0.9 (official percentile 70 = 0.63 -> >= 0.63)
    masks = top_fraction_mask(scores, 0.3)
    assert masks[0].tolist() == [[False, False], [True, False]]
    assert masks[1].tolist() == [True, False, True, False, False, False]
    # 11 values 0..10: percentile 70 is exactly 7 -> 7, 8, 9, 10 are kept
    assert top_fraction_mask([torch.arange(11.0)], 0.3)[0].nonzero().flatten().tolist() == [7, 8, 9, 10]
    ties = torch.tensor([1.0, 1.0, 1.0, 5.0])  # percentile 50 = 1: all ties stay
    assert top_fraction_mask([ties], 0.5)[0].tolist() == [True] * 4


@pytest.mark.parametrize("reserve_p", [0.3, 0.1, 0.5, 1.0])
def test_top_fraction_mask_matches_the_official_numpy_percentile(reserve_p):
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 5, generator=g) ** 3, torch.rand(13, generator=g), torch.zeros(4)]
    flat = torch.cat([s.flatten() for s in scores]).numpy()
    polar = np.percentile(flat, (1 - reserve_p) * 100)  # official calculate_fisher
    ours = torch.cat([m.flatten() for m in top_fraction_mask(scores, reserve_p)]).numpy()
    assert (ours == (flat >= polar)).all()


def test_fisher_is_the_mean_squared_per_tensor_clipped_gradient():
    model = tiny_model()
    method, _ = child(model, "d")
    batches = [batch(4, seed=s) for s in (1, 2)]
    fisher, tokens = fisher_information(model, method.params, iter(batches), 2, False, 0.05, None)
    expected = [torch.zeros_like(p) for p in method.params]
    for b in batches:
        model.zero_grad()
        task_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"],
                  False).backward()
        for e, p in zip(expected, method.params):
            norm = p.grad.norm()
            g = p.grad * (0.05 / (norm + 1e-6)) if norm > 0.05 else p.grad
            e += g**2 / 2
    assert int(tokens) == sum(int(b["attention_mask"].sum()) for b in batches)
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-12)


def test_d_keeps_only_the_child_network_unscaled():
    model = tiny_model()
    method, opt = child(model, "d")
    g = torch.Generator().manual_seed(4)
    mask = [torch.rand(p.shape, generator=g) < 0.3 for p in method.params]
    method.set_mask(mask)
    before = backward(model)
    logs = method.optimizer_step(opt, model)
    params = dict(model.named_parameters())
    for n, m in zip(method.names, mask):
        assert torch.equal(params[n].grad, before[n] * m)  # no 1/p in D
    expected = sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask)
    assert logs["child/mask_density"] == pytest.approx(expected)


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_eligible_tensors_are_the_encoder_layers_of_every_family(arch):
    model = tiny_model(arch)
    method, _ = child(model, "d")
    emb = {id(p) for p in model.get_input_embeddings().parameters()}
    assert method.params and all(".layer." in n for n in method.names)
    assert not any(id(p) in emb for p in method.params)
    assert not any("classifier" in n or "pooler" in n for n in method.names)
    fisher, _ = fisher_information(model, method.params, iter([batch(4)]), 1, False, 1.0, None)
    method.set_mask(top_fraction_mask(fisher, 0.3))
    assert abs(float(method.density) - 0.3) < 0.01


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="variant"):
        ChildTuning(name="child_tuning", variant="x", reserve_p=0.3, eligible=RULE, inner=Vanilla(name="vanilla"))
    with pytest.raises(UserError, match="reserve_p"):
        ChildTuning(name="child_tuning", variant="f", reserve_p=0.0, eligible=RULE, inner=Vanilla(name="vanilla"))
    with pytest.raises(UserError, match="eligible"):
        ChildTuning(name="child_tuning", variant="f", reserve_p=0.3, eligible={"contain": ["layer"]}, inner=Vanilla(name="vanilla"))
    with pytest.raises(UserError, match="no trained tensor"):
        child(tiny_model(), "f", rule={"contains": ["nothing_like_this"], "excludes": []})


# --- real runs through the runner ---------------------------------------------------------------
@needs_data()
@pytest.mark.parametrize("over", [["selector.variant=d"], ["selector.variant=f"], ["method=match_tuning"]])
def test_selector_trains_around_methods(over, tiny_overrides, tmp_path):
    cfg = make_cfg([*tiny_overrides, "trainer.epochs=1", "trainer.log_every=1", "selector=child_tuning", *over])
    metrics = fit(cfg, RunDir(tmp_path))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert metrics["train/steps"] == len(train) == 8
    assert all(abs(r["child/mask_density"] - 0.3) < 0.02 for r in train)
    if cfg.selector.variant == "d":
        fisher = [r for r in rows if r["split"] == "child_fisher"]
        assert len(fisher) == 1 and fisher[0]["batches"] == 8
        assert metrics["child/fisher_flops"] == metrics["cost/train_flops"]  # one epoch, the same batches
        assert metrics["cost/total_flops"] == metrics["cost/train_flops"] + metrics["child/fisher_flops"]
        assert metrics["cost/total_wall_s"] == pytest.approx(metrics["train/wall_s"] + metrics["child/fisher_wall_s"])
        info = json.loads((tmp_path / "run_info.json").read_text())
        assert info["stages"]["fisher"]["status"] == "completed"


@needs_data()
@pytest.mark.parametrize("variant", ["d", "f"])
def test_resume_is_exact_and_the_fisher_mask_is_computed_once(variant, tiny_overrides, tmp_path, monkeypatch):
    calls = []
    real = ct.fisher_information

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ct, "fisher_information", counted)
    over = [*tiny_overrides, "trainer.epochs=1", "selector=child_tuning", f"selector.variant={variant}"]
    full = fit(make_cfg(over), RunDir(tmp_path / "full"))
    calls.clear()
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "+trainer.interrupt_at_step=5"]), RunDir(tmp_path / "cut"))
    resumed = fit(make_cfg(over), RunDir(tmp_path / "cut"))
    assert len(calls) == (1 if variant == "d" else 0)  # the resumed run restored the mask
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    drop = ("wall_s", "examples_per_s")
    assert {k: v for k, v in resumed.items() if not k.endswith(drop)} == {
        k: v for k, v in full.items() if not k.endswith(drop)}
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert rows.count("child_fisher") == (1 if variant == "d" else 0)
