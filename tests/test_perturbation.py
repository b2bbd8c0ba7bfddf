"""The embedding-perturbation methods: method=r3f/r4f, smart, freelb (robustft/methods/perturb.py shared).

Formulas on hand-computed numbers, the perturbations' norms, r4f's spectral normalisation (and its plain
checkpoints), zero weights = vanilla gradients, FreeLB's gradients = the official loop's, every family of
tiny random model, composition with ROSE and an exact resume of SMART's EMA through the runner.
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from robustft.errors import Interrupted, UserError
from robustft.methods.base import Method, model_inputs
from robustft.methods.freelb import ascent_update as freelb_update
from robustft.methods.freelb import init_delta
from robustft.methods.perturb import divergence, symmetric_kl
from robustft.methods.r3f import output_layer
from robustft.methods.smart import ascent_update as smart_update
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import one_thread, tiny_model  # noqa: F401  (one_thread: module fixture)
from tests.weight_mixup_helpers import batch, ctx

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("r3f", "r4f", "smart", "freelb")
OPT = OmegaConf.create({"weight_decay": 0.01, "lr": 1e-3})




@cache
def yaml_config(name: str):
    return make_cfg([f"method={name}"]).method


def method(name: str, model: nn.Module | None = None, **overrides) -> Method:
    """The method with the composed YAML's options + overrides, set up on `model` when given."""
    options = {**OmegaConf.to_container(yaml_config(name)), **overrides}
    m = get_class(options.pop("_target_"))(**options)
    if model is not None:
        m.setup(model, ctx())
    return m


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the shared divergence -------------------------------------------------------------------------
def test_symmetric_kl_on_hand_computed_logits():
    p = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], requires_grad=True)  # rows: (1/4, 3/4), (1/2, 1/2)
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)  # (1/2, 1/2) twice
    kl_pq = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected = (kl_pq + kl_qp + 0.0) / 2  # batch mean: the second row's distributions are equal
    assert math.isclose(symmetric_kl(p, q).item(), expected, rel_tol=1e-6)
    assert math.isclose(symmetric_kl(q, p, detach_targets=True).item(), expected, rel_tol=1e-6)
    # detached targets: d/dp = d/dp KL(q||p) only = (softmax(p) - softmax(q)) / batch
    (g,) = torch.autograd.grad(symmetric_kl(p, q, detach_targets=True), p)
    torch.testing.assert_close(g, (p.softmax(-1) - q.softmax(-1)).detach() / 2)
    (g_full,) = torch.autograd.grad(symmetric_kl(p, q), p)  # R3F: both terms differentiate p
    assert not torch.allclose(g_full, g)
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [4.0]])
    assert math.isclose(divergence(a, b, is_regression=True).item(), (0.25 + 4.0) / 2)


# --- R3F / R4F --------------------------------------------------------------------------------------
class LinearOnEmbeddings(nn.Module):
    """logits = mean over tokens of (embeddings @ W): R3F's loss can be written out by hand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.w = nn.Embedding(10, 4), nn.Parameter(torch.randn(4, 2))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, **_):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return type("Out", (), {"logits": (e @ self.w).mean(1)})()


@pytest.mark.parametrize("noise_type", ["uniform", "normal"])
def test_r3f_loss_written_out(noise_type):
    model, eps, lam = LinearOnEmbeddings(), 0.5, 0.7
    m = method("r3f", model, eps=eps, r3f_lambda=lam, noise_type=noise_type)
    ids, labels = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 1])
    torch.manual_seed(3)
    out = m.training_step(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    torch.manual_seed(3)
    z = torch.empty(2, 3, 4)
    z = z.uniform_(-eps, eps) if noise_type == "uniform" else z.normal_(0, eps)
    with torch.no_grad():
        e = model.emb(ids)
        clean, noised = (e @ model.w).mean(1), ((e + z) @ model.w).mean(1)
        p, q = clean.softmax(-1), noised.softmax(-1)
        ce = -p.log()[torch.arange(2), labels].mean()
        kl = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert math.isclose(out.loss.item(), (ce + lam * kl).item(), rel_tol=1e-5)
    assert kl > 1e-4 and math.isclose(m.step_logs()["r3f/kl"], kl.item(), rel_tol=1e-5)
    out.loss.backward()  # the noised forward starts from detached embeddings: only the clean one trains E
    rows = model.emb.weight.grad.abs().sum(-1)
    assert rows[1:7].gt(0).all() and rows[[0, 7, 8, 9]].eq(0).all()


def test_r3f_noise_stays_within_eps():
    m = method("r3f", LinearOnEmbeddings(), eps=1e-5)
    z = m.noise(torch.zeros(64, 32, 16))
    assert z.abs().max() <= 1e-5 and z.abs().max() > 0.99e-5 and abs(z.mean()) < 1e-7
    n = method("r3f", LinearOnEmbeddings(), eps=1e-3, noise_type="normal").noise(torch.zeros(64, 32, 16))
    assert math.isclose(n.std().item(), 1e-3, rel_tol=0.02)


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_r4f_head_is_spectrally_normalised_and_checkpoints_stay_plain(arch):
    model = tiny_model(arch, dropout=0.1)
    with torch.no_grad():
        output_layer(model).weight.mul_(30)  # far from norm 1 before
    m = method("r4f", model)
    layer = output_layer(model)
    for s in range(5):  # a few training forwards: one power iteration each
        m.training_step(model, batch(4, 7, s))
    model.eval()
    assert math.isclose(torch.linalg.matrix_norm(layer.weight, 2).item(), 1.0, rel_tol=1e-3)
    # the state dict also carries the plain weight: a model without the parametrisation predicts the same
    state = model.state_dict()
    plain = tiny_model(arch).eval()
    plain.load_state_dict(state, strict=False)
    x = model_inputs(batch(3, 7, 9))
    torch.testing.assert_close(plain(**x).logits, model(**x).logits)
    model.load_state_dict(state)  # strict: the derived plain weight is not an unexpected key
    if arch == "roberta":  # spectral_norm=head: the head's dense layer too
        both = tiny_model(arch)
        method("r4f", both, spectral_norm="head")
        assert hasattr(both.classifier.dense, "parametrizations") and hasattr(both.classifier.out_proj, "parametrizations")


# --- SMART ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_p", ["inf", "l2"])
def test_smart_delta_stays_in_its_ball(norm_p):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 5, 8, generator=g) * 1e-5
    grad = torch.randn(3, 5, 8, generator=g)
    for eps in (1e-5, 1e-2):
        new = smart_update(delta, grad, 1e-3, eps, norm_p)
        size = new.abs().amax(-1) if norm_p == "inf" else new.norm(dim=-1)
        assert (size <= eps * (1 + 1e-5)).all()
    # a large ball: a plain step along the normalised gradient (per token)
    step = smart_update(torch.zeros(3, 5, 8), grad, 1e-3, 1.0, norm_p)
    unit = grad / (grad.abs().amax(-1, keepdim=True) if norm_p == "inf" else grad.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(step, 1e-3 * unit)


def test_smart_adversarial_delta_in_a_training_step_and_loss():
    model = tiny_model("bert", dropout=0.0)
    m = method("smart", model, epsilon=0.01, step_size=0.1, norm_p="l2", alpha=2.0)
    b = batch(4, 7, 1)
    torch.manual_seed(0)
    out = m.training_step(model, b)
    delta = m.delta
    sizes = delta.norm(dim=-1)
    assert sizes.max() <= 0.01 * (1 + 1e-5) and sizes[b["attention_mask"].bool()].min() > 0.009
    with torch.no_grad():  # no dropout: the loss is CE + alpha * l_s(clean, f(e + delta)) at that delta
        clean = model(**model_inputs(b)).logits
        e = model.get_input_embeddings()(b["input_ids"])
        adv = model(inputs_embeds=e + delta, attention_mask=b["attention_mask"]).logits
    expected = F.cross_entropy(clean, b["labels"]) + 2.0 * symmetric_kl(clean, adv)
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)


def test_smart_proximal_ema_update_and_state():
    model = tiny_model("bert")
    m = method("smart", model, mu=1.0, beta=0.9, alpha=0.0)
    opt = m.configure_optimizer(model, OPT)
    theta0 = [p.detach().clone() for p in model.parameters()]
    out = m.training_step(model, batch(4, 7, 0))
    out.loss.backward()
    logs = m.optimizer_step(opt, model)
    assert set(logs) == {"smart/prox"} and abs(logs["smart/prox"]) < 1e-9  # the EMA starts at theta_0
    for e, t0, p in zip(m.ema, theta0, model.parameters()):
        torch.testing.assert_close(e, 0.9 * t0 + 0.1 * p.detach())
    fresh = method("smart", tiny_model("bert"), mu=1.0, beta=0.9)
    fresh.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema, m.ema))


# --- FreeLB ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_freelb_delta_init_and_projection(norm_type):
    embeds, mask = torch.zeros(3, 6, 8), torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    torch.manual_seed(0)
    d0 = init_delta(embeds, mask, 0.6, norm_type)
    assert d0[0, 4:].eq(0).all() and d0[1].ne(0).all()
    if norm_type == "l2":  # U(-1, 1) * mag / sqrt(L d): norm <= mag, about mag / sqrt(3) on average
        assert (d0.flatten(1).norm(dim=1) <= 0.6).all() and d0.flatten(1).norm(dim=1).min() > 0.2
    else:
        assert d0.abs().max() <= 0.6
    grad = torch.randn(3, 6, 8) * mask.unsqueeze(-1)
    new = freelb_update(d0, grad, 1.0, 0.3, norm_type)
    size = new.flatten(1).norm(dim=1) if norm_type == "l2" else new.flatten(1).abs().amax(1)
    assert (size <= 0.3 * (1 + 1e-5)).all() and math.isclose(size.max().item(), 0.3, rel_tol=1e-5)
    free = freelb_update(d0, grad, 0.1, 0.0, norm_type)  # max_norm 0: no projection
    unit = grad.flatten(1).norm(dim=1) if norm_type == "l2" else grad.flatten(1).abs().amax(1)
    torch.testing.assert_close(free, d0 + 0.1 * grad / unit.view(-1, 1, 1))


def official_freelb(model, b, steps, adv_lr, init_mag, max_norm):
    """zhuchen03/FreeLB run_glue_freelb.py's loop (l2), dropout masks replayed as its dp_masks."""
    emb, m = model.get_input_embeddings(), b["attention_mask"].float()
    embeds_init = emb(b["input_ids"])
    delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * m.unsqueeze(2)
    delta = (delta * (init_mag / torch.sqrt(m.sum(1) * embeds_init.size(-1))).view(-1, 1, 1)).detach()
    rng = torch.get_rng_state()
    for astep in range(steps):
        torch.set_rng_state(rng)
        delta.requires_grad_()
        logits = model(inputs_embeds=delta + embeds_init, attention_mask=b["attention_mask"]).logits
        (F.cross_entropy(logits, b["labels"]) / steps).backward()
        if astep == steps - 1:
            break
        g = delta.grad.clone().detach()
        delta = (delta + adv_lr * g / g.view(g.size(0), -1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)).detach()
        n = delta.view(delta.size(0), -1).norm(dim=1)
        exceed = (n > max_norm).float()
        delta = (delta * (max_norm / n * exceed + (1 - exceed)).view(-1, 1, 1)).detach()
        embeds_init = emb(b["input_ids"])
    return grads_of(model)


@pytest.mark.parametrize("arch", ["bert", "deberta"])
def test_freelb_gradients_equal_the_official_loop_under_accumulation(arch):
    ref = tiny_model(arch, dropout=0.1)
    b = batch(4, 7, 2)
    torch.manual_seed(5)
    expected = official_freelb(ref, b, 3, 0.1, 0.6, 0.15)
    model = tiny_model(arch, dropout=0.1)
    m = method("freelb", model, adv_steps=3, adv_lr=0.1, adv_init_mag=0.6, adv_max_norm=0.15)
    torch.manual_seed(5)
    (m.training_step(model, b).loss / 2).backward()  # as the loop does with two micro-batches per step
    got = grads_of(model)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(2 * got[k], expected[k], rtol=1e-4, atol=1e-7)
    assert m.delta.flatten(1).norm(dim=1).max() <= 0.15 * (1 + 1e-5)
    assert math.isclose(m.step_logs()["freelb/delta_norm"], m.delta.flatten(1).norm(dim=1).mean().item(), rel_tol=1e-5)


# --- zero weights = vanilla -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "zero"), [("r3f", {"r3f_lambda": 0.0}), ("smart", {"alpha": 0.0}),
                                            ("freelb", {"adv_steps": 2, "adv_lr": 0.0, "adv_init_mag": 0.0})])
def test_zero_perturbation_weight_gives_vanillas_gradients(name, zero):
    grads = []
    for m in (Method("vanilla"), method(name, **zero)):
        model = tiny_model("bert", dropout=0.1)
        m.setup(model, ctx())
        torch.manual_seed(1)
        m.training_step(model, batch(4, 7, 3)).loss.backward()
        grads.append(grads_of(model))
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])  # FreeLB: g/2 + g/2, same masks


# --- every family, the options ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
@pytest.mark.parametrize("name", METHODS)
def test_trains_on_every_family(name, arch):
    model = tiny_model(arch, dropout=0.1)
    m = method(name, model, **({"mu": 1.0} if name == "smart" else {}))
    opt = m.configure_optimizer(model, OPT)
    before = copy.deepcopy(model.state_dict())
    for s in range(2):
        out = m.training_step(model, batch(4, 7, s))
        out.loss.backward()
        logs = m.optimizer_step(opt, model)
        opt.zero_grad()
    assert math.isfinite(out.loss.item()) and out.logits.shape == (4, 2)
    assert logs and all(math.isfinite(v) for v in logs.values())
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k in model.state_dict())


@pytest.mark.parametrize(("name", "bad"), [("r3f", {"noise_type": "gauss"}), ("r3f", {"eps": -1}),
                                           ("r4f", {"spectral_norm": "all"}), ("smart", {"k": 0}),
                                           ("smart", {"norm_p": "l1"}), ("smart", {"beta": 1.0}),
                                           ("freelb", {"adv_steps": 0}), ("freelb", {"norm_type": "inf"})])
def test_bad_options_are_user_errors(name, bad):
    with pytest.raises(UserError, match="method\\."):
        method(name, **bad)
    with pytest.raises(TypeError, match="unexpected keyword"):
        method(name, unexpected_option=1)


# --- through the runner -----------------------------------------------------------------------------------
TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=16", "task.max_eval_samples=16",
        "trainer.epochs=2", "trainer.batch_size=8", "trainer.eval_every=4", "trainer.log_every=1",
        "trainer.save_every=2", "trainer.precision=fp32", "trainer.max_length=32", "seed=5"]
LOGGED = {"r3f": "r3f/kl", "r4f": "r3f/kl", "smart": "smart/adv_kl", "freelb": "freelb/delta_norm"}


def train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@needs_data()
@pytest.mark.parametrize(("name", "variant"), [*((n, "second") for n in METHODS), ("freelb", "first")])
def test_composes_with_rose(name, variant, tmp_path):
    """second: ROSE masks the method's own step; first/ensemble: ROSE's two dropout forwards replace the
    method's loss (the perturbation is not used: only the method's forward, here the clean one)."""
    over = [*TINY, f"method={name}", "selector=rose", f"selector.variant={variant}", "trainer.grad_accum=2"]
    result = fit(make_cfg(over), RunDir(tmp_path / name))
    assert result["train/steps"] == 2
    rows = train_rows(tmp_path / name)
    assert all("rose/updated_frac" in r and (LOGGED[name] in r) == (variant == "second") for r in rows)


@needs_data()
def test_smart_with_proximal_term_resumes_exactly(tmp_path):
    over = [*TINY, "method=smart", "method.mu=1.0", "trainer.epochs=3"]
    full = fit(make_cfg(over), RunDir(tmp_path / "full"))
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "+trainer.interrupt_at_step=3"]), RunDir(tmp_path / "cut"))
    resumed = fit(make_cfg(over), RunDir(tmp_path / "cut"))
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "last" / "model.safetensors")) for d in ("full", "cut"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed["validation/accuracy"] == full["validation/accuracy"]
    rows_full, rows_cut = train_rows(tmp_path / "full"), train_rows(tmp_path / "cut")
    assert rows_full[-1]["smart/prox"] > 0 and rows_cut[-1]["smart/prox"] == rows_full[-1]["smart/prox"]
