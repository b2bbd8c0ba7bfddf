"""method=mixout: the mixed weight and its gradient by hand, E[W~] = W, p = 0 is vanilla, plain HF
checkpoints, the three architectures, and composition with selector=rose."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForSequenceClassification

from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, adamw, decay_groups
from robustft.methods.mixout import Mixout, MixoutLinear, draw_mask, mixout_weight
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import tiny_model as tiny
from tests.tiny_models import token_batch


def tiny_model(arch: str, dropout: float = 0.1, seed: int = 0) -> nn.Module:
    return tiny(arch, dropout=dropout, seed=seed)  # these methods act on dropout: on by default here


def batch(n: int = 6, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    return token_batch(n, length, seed)


def ctx() -> TrainContext:
    return TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=OmegaConf.create({"log_every": 1}),
                        device=torch.device("cpu"), seed=0)


W0 = [[1.0, 2.0], [3.0, 4.0]]
W = [[5.0, 6.0], [7.0, 8.0]]


def test_mixed_weight_and_gradient_by_hand():
    w = torch.tensor(W, requires_grad=True)
    # p = 0.5, input feature 0 kept (m = 1), feature 1 mixed out (m = 0): official
    # ((1 - m) W0 + m W - p W0) / (1 - p): column 0 (5 - 0.5) / 0.5 = 9, (7 - 1.5) / 0.5 = 11; column 1 = W0's
    mixed = mixout_weight(w, torch.tensor(W0), torch.tensor([[1.0, 0.0]]), 0.5)
    assert mixed.tolist() == [[9.0, 2.0], [11.0, 4.0]]
    mixed.sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]  # official gradient: dL/dW~ * m


def test_expected_weight_is_the_weight():
    """E[W~] over the 2^in masks (P(m_j = 1) = 1 - p) is W: mixout is unbiased, like dropout."""
    p, w, w0 = 0.3, torch.tensor(W, dtype=torch.float64), torch.tensor(W0, dtype=torch.float64)
    expected = torch.zeros_like(w)
    for bits in itertools.product([0.0, 1.0], repeat=2):
        prob = math.prod((1 - p) if b else p for b in bits)
        expected += prob * mixout_weight(w, w0, torch.tensor([bits], dtype=torch.float64), p)
    assert torch.allclose(expected, w, atol=1e-12)


def test_a_drawn_mask_in_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    layer = MixoutLinear(linear, 0.6)
    with torch.no_grad():
        linear.weight.add_(1.0)  # W moved away from W0 (the weight when wrapped)
    x = torch.randn(4, 5)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = draw_mask(linear.weight, 0.6)  # one value per input feature, shared by all rows and the batch
    assert mask.shape == (1, 5) and set(mask.flatten().tolist()) <= {0.0, 1.0}
    assert torch.equal(y, F.linear(x, mixout_weight(linear.weight, layer.weight0, mask, 0.6), linear.bias))
    expected_w = layer.weight0 + mask / 0.4 * (linear.weight - layer.weight0)
    assert torch.allclose(F.linear(x, expected_w, linear.bias), y, atol=1e-5)
    layer.eval()
    assert torch.equal(layer(x), linear(x))  # evaluation: the plain layer
    with pytest.raises(UserError, match="method.p"):
        Mixout("mixout", p=1.0, zero_dropout=True)


def step(method: Method, model: nn.Module, b: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.setup(model, ctx())
    torch.manual_seed(5)
    out = method.training_step(model, b)
    return out.loss, torch.autograd.grad(out.loss, list(model.parameters()))


def test_p_zero_is_vanilla_bit_for_bit():
    b = batch()
    loss, grads = step(Mixout("mixout", p=0.0, zero_dropout=False), tiny_model("bert"), b)
    ref_loss, ref_grads = step(Method("vanilla"), tiny_model("bert"), b)
    assert torch.equal(loss, ref_loss) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    # zero_dropout (official): p = 0 is then vanilla fine-tuning of the model without dropout
    loss, grads = step(Mixout("mixout", p=0.0, zero_dropout=True), tiny_model("bert"), b)
    ref_loss, ref_grads = step(Method("vanilla"), tiny_model("bert", dropout=0.0), b)
    assert torch.equal(loss, ref_loss) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_trains_and_saves_a_plain_hf_model(arch, tmp_path):
    model, b = tiny_model(arch), batch()
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    method = Mixout("mixout", p=0.7, zero_dropout=True)
    model = method.setup(model, ctx())
    info = method.run_info()["mixout"]
    assert info["layers"] == n_linear and sum(isinstance(m, MixoutLinear) for m in model.modules()) == n_linear
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout)) and info["dropout_zeroed"] > 0
    assert list(model.state_dict()) == keys  # W0 is a non-persistent buffer
    opt = adamw(decay_groups(model.named_parameters(), 0.01), 1e-2, torch.device("cpu"))
    for _ in range(3):
        out = method.training_step(model, b)
        out.loss.backward()
        logs = method.optimizer_step(opt, model)
        opt.zero_grad()
    assert math.isfinite(out.loss.item()) and float(logs["mixout/dist"]) > 0
    layers = [m for m in model.modules() if isinstance(m, MixoutLinear)]
    assert all(not torch.equal(m.weight, m.weight0) for m in layers)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert all(type(m) is not MixoutLinear for m in loaded.modules())
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@needs_data()
def test_composes_with_rose(tmp_path, tiny_overrides):
    over = [*tiny_overrides, "trainer.epochs=1", "method=mixout", "selector=rose"]
    metrics = fit(make_cfg(over), RunDir(tmp_path / "m"))
    assert metrics["train/steps"] == 8 and math.isfinite(metrics["validation/loss"])
    info = json.loads((tmp_path / "m" / "run_info.json").read_text())
    assert info["mixout"]["p"] == 0.9 and info["mixout"]["layers"] > 0
