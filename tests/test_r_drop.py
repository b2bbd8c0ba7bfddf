"""method=r_drop: the loss on hand-computed logits, alpha = 0 and no-dropout invariants, the three
architectures, and composition with selector=rose."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, adamw, decay_groups, model_inputs
from robustft.methods.r_drop import RDrop, rdrop_divergence
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import tiny_model as tiny
from tests.tiny_models import token_batch


def tiny_model(arch: str, dropout: float = 0.1, seed: int = 0) -> nn.Module:
    return tiny(arch, dropout=dropout, seed=seed)  # R-Drop acts on dropout: on by default here


def batch(n: int = 6, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    return token_batch(n, length, seed)


def ctx(regression: bool = False) -> TrainContext:
    return TrainContext(task=OmegaConf.create({"is_regression": regression}), trainer=OmegaConf.create({"log_every": 1}),
                        device=torch.device("cpu"), seed=0)


class Fixed(nn.Module):
    """A 'model' whose logits (rows: the doubled batch) are a parameter: the loss is known in closed form."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(rows))

    def forward(self, **_):
        return type("Out", (), {"logits": self.logits})()


def test_loss_on_hand_computed_logits():
    # pass 1: [0, ln 3] -> p1 = (1/4, 3/4); pass 2: [0, 0] -> p2 = (1/2, 1/2); label 1
    ce1, ce2 = -math.log(3 / 4), math.log(2)
    kl12 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(p1 || p2)
    kl21 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(p2 || p1)
    d = (kl12 + kl21) / 2
    method = RDrop("r_drop", alpha=1.0)
    method.setup(nn.Identity(), ctx())
    one = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([1])}
    out = method.training_step(Fixed([[0.0, math.log(3)], [0.0, 0.0]]), one)
    assert math.isclose(out.loss.item(), (ce1 + ce2) / 2 + 0.5 * 1.0 * d, rel_tol=1e-6)
    assert math.isclose(rdrop_divergence(torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2), False).item(), d,
                        rel_tol=1e-6)
    assert math.isclose(method.optimizer_step(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0), None)["rdrop/kl"],
                        d, rel_tol=1e-6)
    # regression (STS-B): MSE of both passes to the target, MSE between the passes as the divergence
    reg = RDrop("r_drop", alpha=3.0)
    reg.setup(nn.Identity(), ctx(regression=True))
    target = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([1.5])}
    out = reg.training_step(Fixed([[1.0], [2.0]]), target)  # MSEs 0.25 and 0.25, MSE(z1, z2) = 1
    assert math.isclose(out.loss.item(), 0.25 + 0.5 * 3.0 * 1.0, rel_tol=1e-6)
    with pytest.raises(UserError, match="alpha"):
        RDrop("r_drop", alpha=-1)


def test_alpha_zero_is_the_mean_task_loss_of_two_dropout_passes():
    model, b = tiny_model("bert"), batch()
    method = RDrop("r_drop", alpha=0.0)
    method.setup(model, ctx())
    torch.manual_seed(3)
    out = method.training_step(model, b)
    torch.manual_seed(3)  # the same dropout masks: one forward of the batch concatenated with itself
    both = model(**{k: torch.cat([v, v]) for k, v in model_inputs(b).items()}).logits
    z1, z2 = both[:6], both[6:]
    assert not torch.allclose(z1, z2)  # dropout: two different sub-networks
    expected = 0.5 * (F.cross_entropy(z1, b["labels"]) + F.cross_entropy(z2, b["labels"]))
    assert torch.equal(out.loss, expected)
    assert method.optimizer_step(torch.optim.SGD(model.parameters(), lr=0.0), model)["rdrop/kl"] > 0


def test_without_dropout_it_is_vanilla():
    """No dropout: both halves are the same network, the KL is 0 and loss and gradients are vanilla's."""
    model, b = tiny_model("bert", dropout=0.0), batch()
    method, vanilla = RDrop("r_drop", alpha=1.0), Method("vanilla")
    for m in (method, vanilla):
        m.setup(model, ctx())
    out = method.training_step(model, b)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    ref = vanilla.training_step(model, b)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_trains_on_each_architecture(arch):
    model, b = tiny_model(arch), batch()
    method = RDrop("r_drop", alpha=1.0)
    method.setup(model, ctx())
    opt = adamw(decay_groups(model.named_parameters(), 0.01), 1e-2, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        out = method.training_step(model, b)
        out.loss.backward()
        losses.append(out.loss.item())
        logs = method.optimizer_step(opt, model)
        opt.zero_grad()
        assert logs["rdrop/kl"] > 0 and out.logits.shape == (6, 2)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@needs_data()
def test_composes_with_rose_second_order(tmp_path, tiny_overrides):
    """selector=rose variant=second runs R-Drop's own training step (its loss and rdrop/kl) under the mask."""
    over = [*tiny_overrides, "trainer.epochs=1", "method=r_drop", "selector=rose", "selector.variant=second"]
    metrics = fit(make_cfg(over), RunDir(tmp_path / "r"))
    assert metrics["train/steps"] == 8 and math.isfinite(metrics["validation/loss"])
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all("rdrop/kl" in r and "rose/updated_frac" in r for r in train)
