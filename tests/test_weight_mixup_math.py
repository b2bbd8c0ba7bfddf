"""method=weight_mixup, the mathematics: the mixed layer, the finite-difference hypergradient, dropout replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from robustft.methods.base import model_inputs, task_loss
from robustft.methods.weight_mixup import MixedLinear, mixed_linear_names
from robustft.methods.weight_mixup import SameDropout as WMSameDropout
from tests.tiny_models import one_thread, tiny_model  # noqa: F401  (one_thread: module fixture)
from tests.weight_mixup_helpers import batch, ctx, perturb_alpha, weight_mixup

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the mixed layer ------------------------------------------------------------------------------
def test_alpha_one_with_code_complement_equals_plain_linear():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(linear.state_dict())
    mixed = MixedLinear(linear, "code")
    with torch.no_grad():
        mixed.weight.add_(torch.randn(3, 5))  # W moves away from W0
        ref.weight.copy_(mixed.weight)
    assert not torch.equal(mixed.weight, mixed.weight0)
    x1 = torch.randn(4, 7, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = mixed(x1), ref(x2)
    assert torch.equal(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(mixed.weight.grad, ref.weight.grad) and torch.equal(mixed.bias.grad, ref.bias.grad)
    assert torch.equal(mixed.effective_weight(), ref.weight)


@pytest.mark.parametrize("complement", ["code", "paper"])
def test_mixed_linear_gradients_match_plain_autograd(complement):
    torch.manual_seed(1)
    mixed = MixedLinear(nn.Linear(6, 4).double(), complement)
    with torch.no_grad():
        mixed.weight.add_(torch.randn_like(mixed.weight))
        mixed.a1.uniform_(0.2, 1)
        mixed.a2.uniform_(0.2, 1)
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    params = [x, mixed.weight, mixed.bias, mixed.a1, mixed.a2]
    grads = []
    for reference in (False, True):
        mixed.reference = reference
        grads.append(torch.autograd.grad(mixed(x).sin().sum(), params))
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # the custom function (saving only x) also gives the same outputs as the plain ops
    mixed.reference = False
    y = mixed(x)
    mixed.reference = True
    torch.testing.assert_close(y, mixed(x), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_wrapping_architectures_and_folded_export(arch, tmp_path):
    model = tiny_model(arch).eval()
    x = batch(3, 9, seed=2)
    before = model(**model_inputs(x)).logits
    method = weight_mixup(folds=1)
    method.setup(model, ctx())
    names = mixed_linear_names(model)
    assert not names  # the wrapped modules are MixedLinear now
    per_layer = {n.rsplit(".", 1)[-1] for n in method.mixed}
    assert len([n for n in method.mixed if ".layer.0." in n]) == 6  # Q, K, V, attention out, FFN in, FFN out
    assert any("pooler" in n for n in method.mixed) == (arch != "roberta")  # RoBERTa's head is not mixed
    assert not any(n.startswith("classifier") or "embeddings" in n for n in method.mixed), per_layer
    assert torch.equal(model(**model_inputs(x)).logits, before)  # a1 = a2 = 1 after setup: the same model
    # after mixing, the saved folder is a plain model that computes the same function
    perturb_alpha(method)
    with torch.no_grad():
        for m in method.mixed.values():
            m.weight.add_(0.01 * torch.randn_like(m.weight))
    mixed_logits = model(**model_inputs(x)).logits
    model.save_pretrained(tmp_path)
    assert not any(k.endswith((".a1", ".a2", "weight0")) for k in load_file(str(tmp_path / "model.safetensors")))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, MixedLinear) for m in plain.modules())
    torch.testing.assert_close(plain(**model_inputs(x)).logits, mixed_logits, rtol=1e-5, atol=1e-6)
    # and loading the folded weights back into a mixed model gives the same function (alpha = 1)
    model.load_state_dict(plain.state_dict())
    assert all(torch.equal(m.a1, torch.ones_like(m.a1)) for m in method.mixed.values())
    torch.testing.assert_close(model(**model_inputs(x)).logits, mixed_logits, rtol=1e-5, atol=1e-6)


# --- the hypergradient ------------------------------------------------------------------------------
def hyper_setup(precondition: str, arch: str = "bert", dtype=torch.float64):
    model = tiny_model(arch, dtype=dtype)
    method = weight_mixup(folds=1, fd={"precondition": precondition})
    method.setup(model, ctx())
    stage = method.bilevel
    stage.start_fold(model, 0)
    perturb_alpha(stage)
    model.train()
    b_tr, b_val = batch(4, 9, seed=3), batch(4, 7, seed=4)
    stage.inner_step(model, b_tr)  # W moves away from W0, the inner Adam state exists
    return model, stage, b_tr, b_val


def exact_hypergradient(model, stage, b_tr, b_val, loss=task_loss) -> list[torch.Tensor]:
    """d_alpha L_val - d_alpha <d_W L_tr, P d_W L_val> by double backward through plain autograd ops."""
    for m in stage.mixed.values():
        m.reference = True
    alphas, inner = stage.alphas(), stage._inner_list
    loss_val = loss(model(**model_inputs(b_val)).logits, b_val["labels"], False)
    grads = torch.autograd.grad(loss_val, alphas + inner)
    direct, v = grads[: len(alphas)], stage.precondition([g.detach() for g in grads[len(alphas):]])
    loss_tr = loss(model(**model_inputs(b_tr)).logits, b_tr["labels"], False)
    g_w = torch.autograd.grad(loss_tr, inner, create_graph=True)
    mixed_second = torch.autograd.grad(sum((g * vv).sum() for g, vv in zip(g_w, v)), alphas)
    for m in stage.mixed.values():
        m.reference = False
    return [d - h for d, h in zip(direct, mixed_second)]


def ce64(logits: torch.Tensor, labels: torch.Tensor, is_regression: bool = False) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)  # task_loss casts to fp32; keep float64 here


@pytest.mark.parametrize("precondition", ["adam", "none"])
def test_fd_hypergradient_matches_exact_second_order(precondition, monkeypatch):
    import robustft.methods.weight_mixup.bilevel as wm

    monkeypatch.setattr(wm, "task_loss", ce64)
    model, stage, b_tr, b_val = hyper_setup(precondition)
    exact = torch.cat([g.flatten() for g in exact_hypergradient(model, stage, b_tr, b_val, ce64)])
    direct = torch.autograd.grad(ce64(model(**model_inputs(b_val)).logits, b_val["labels"]), stage.alphas())
    implicit = torch.cat([g.flatten() for g in direct]) - exact  # the second-order term the FD approximates
    assert implicit.norm() > 1e-2 * exact.norm()  # not negligible: the test checks it, not only d_alpha L_val
    errors = []
    for radius in (0.01, 0.001):  # the official R = 0.01, then a smaller step: O(eps^2) truncation error
        stage.fd["radius"] = radius
        fd, info = stage.hypergradient(model, b_tr, b_val)
        errors.append(float((torch.cat([g.flatten() for g in fd]) - exact).norm()))
        assert info["fd_eps"] > 0
    assert errors[0] <= 1e-3 * float(exact.norm()) and errors[0] <= 1e-2 * float(implicit.norm())
    assert errors[1] <= errors[0] / 20


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_finite_difference_restores_weights_bit_exactly(arch):
    model, stage, b_tr, b_val = hyper_setup("adam", arch=arch, dtype=torch.float32)
    model.train()
    for module in model.modules():  # dropout on: the two passes must share masks
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    hyper, _ = stage.hypergradient(model, b_tr, b_val)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.delta is None and m.eps == 0.0 for m in stage.mixed.values())
    assert all(p.requires_grad for p in model.parameters())  # the passes freeze the non-mixed ones, then thaw
    assert all(torch.isfinite(h).all() for h in hyper) and any(h.abs().sum() > 0 for h in hyper)


class CountingSameDropout(WMSameDropout):
    replayed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.replay and func is torch.ops.aten.bernoulli_.float:
            CountingSameDropout.replayed += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


class NeverReplay(WMSameDropout):
    def __init__(self) -> None:
        super().__init__()
        self.replayable = False  # finite_difference falls back to restoring the RNG state


@pytest.mark.parametrize(("arch", "attn"), [("bert", "eager"), ("bert", "sdpa"), ("roberta", "sdpa"), ("deberta", "eager")])
def test_replayed_dropout_masks_equal_redrawn_ones(arch, attn, monkeypatch):
    import robustft.methods.weight_mixup.hypergrad as wm

    model, stage, b_tr, b_val = hyper_setup("adam", arch=arch, dtype=torch.float32)
    model.config._attn_implementation = attn
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    v = [torch.randn_like(p) for p in stage._inner_list]

    def fd(cls, seed):
        monkeypatch.setattr(wm, "SameDropout", cls)
        torch.manual_seed(seed)
        out = stage.finite_difference(model, b_tr, v, 1e-3)
        return out, torch.get_rng_state()

    CountingSameDropout.replayed = 0
    replayed, rng_replayed = fd(CountingSameDropout, 0)
    assert CountingSameDropout.replayed > 0  # the second pass did replay masks
    redrawn, rng_redrawn = fd(NeverReplay, 0)
    assert all(torch.equal(a, b) for a, b in zip(replayed, redrawn))
    assert torch.equal(rng_replayed, rng_redrawn)  # the RNG ends where it would have
    other, _ = fd(NeverReplay, 1)  # the masks matter: other masks, other result
    assert not all(torch.equal(a, b) for a, b in zip(replayed, other))


def test_same_dropout_refuses_what_it_cannot_replay():
    x = torch.randn(4, 6)
    mode = WMSameDropout()
    with mode:
        y = F.dropout(x, 0.5, training=True)
    assert mode.replayable and len(mode.masks) == 1
    mode.replay = True
    with mode:
        assert torch.equal(F.dropout(x, 0.5, training=True), y)
    assert not mode.masks

    mode = WMSameDropout()
    with mode:
        torch.rand(3)  # a random op it does not record
    assert not mode.replayable
    mode = WMSameDropout()
    with mode:
        mask = torch.empty(5).bernoulli_(0.5)
        mask.sub_(1)  # the mask's zeros move: sign() would not give it back
    assert not mode.replayable
