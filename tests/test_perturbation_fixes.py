"""Fixes from an outside check of the embedding-perturbation baselines (issue #29 item 7).

SMART's ascent against the paper's Algorithm 1 written out by hand (the whole symmetric KL's gradient in the
adversarial distribution), and R4F's spectral normalisation against `torch.nn.utils.spectral_norm`, the
function fairseq's official R4F (`--spectral-norm-classification-head`) calls.
"""

from __future__ import annotations

import pytest
import torch

from robustft.methods.r3f import output_layer
from tests.test_perturbation import method
from tests.tiny_models import one_thread, tiny_model  # noqa: F401  (one_thread: module fixture)
from tests.weight_mixup_helpers import batch, ctx

pytestmark = pytest.mark.usefixtures("one_thread")


def sym_kl_by_hand(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """l_s(p, q) = sum p log(p / q) + q log(q / p), batch mean, p the clean prediction."""
    p, q = clean.softmax(-1), adv.softmax(-1)
    return ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()


def paper_ascent(model, b, clean, noise, k, step, eps, norm_p, loss=sym_kl_by_hand):
    """SMART Algorithm 1 lines 6-10 (norms per token, as the module): x~ = x + nu, then k normalised steps."""
    e = model.get_input_embeddings()(b["input_ids"]).detach()
    delta = noise.clone()
    for _ in range(k):
        delta.requires_grad_()
        adv = model(inputs_embeds=e + delta, attention_mask=b["attention_mask"]).logits
        (g,) = torch.autograd.grad(loss(clean.detach(), adv), delta)
        size = g.abs().amax(-1, keepdim=True) if norm_p == "inf" else g.norm(dim=-1, keepdim=True)
        delta = delta.detach() + step * g / size.clamp_min(torch.finfo(torch.float32).tiny)  # padding: 0 stays 0
        if norm_p == "inf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / delta.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    return delta


@pytest.mark.parametrize("norm_p", ["l2", "inf"])
def test_smart_ascent_follows_the_symmetric_kl_of_algorithm_1(norm_p):
    model = tiny_model("bert", dropout=0.0)
    k, step, eps, sigma = 2, 0.5, 2.0, 0.5  # far from the clean point (where both KL gradients agree)
    m = method("smart", model, k=k, step_size=step, epsilon=eps, noise_var=sigma, norm_p=norm_p)
    b = batch(4, 7, 3)
    with torch.no_grad():
        clean = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.manual_seed(11)
    m.adversarial(model, b, clean)
    torch.manual_seed(11)
    noise = torch.randn(*b["input_ids"].shape, 8) * sigma
    expected = paper_ascent(model, b, clean, noise, k, step, eps, norm_p)
    assert (m.delta - expected).abs().max().item() < 1e-6
    # the earlier ascent (each term's target detached = KL(p || q) only) ends elsewhere
    one_sided = paper_ascent(model, b, clean, noise, k, step, eps, norm_p,
                             loss=lambda c, a: (c.softmax(-1) * (c.log_softmax(-1) - a.log_softmax(-1))).sum(-1).mean())
    assert (one_sided - expected).abs().max().item() > 1e-4  # measured 2e-4 (l2), the match 2e-7


def scaled_head(arch: str) -> torch.nn.Linear:
    """The tiny model's output layer, scaled far from spectral norm 1."""
    layer = output_layer(tiny_model(arch, dropout=0.0))
    with torch.no_grad():
        layer.weight.mul_(30)
    return layer


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_r4f_spectral_norm_equals_the_official_torch_nn_utils_spectral_norm(arch):
    model = tiny_model(arch, dropout=0.0)
    with torch.no_grad():
        output_layer(model).weight.mul_(30)
    m = method("r4f")
    torch.manual_seed(4)
    m.setup(model, ctx())  # registers the parametrisation: draws u, then v
    head = scaled_head(arch)
    torch.manual_seed(4)
    reference = torch.nn.utils.spectral_norm(head)  # fairseq RobertaClassificationHead's call
    layer, x = output_layer(model), torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    for _ in range(4):  # training forwards: one power iteration each, from the first (no warm-up) on
        got, want = layer(x), reference(x)
        assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
        outputs.append(want.detach())
    layer.eval(), reference.eval()
    assert (layer(x) - reference(x)).abs().max().item() < 1e-5 * reference(x).abs().max().item()
    # torch's parametrizations.spectral_norm (15 power iterations at registration) differs in the first forward
    head = scaled_head(arch)
    torch.manual_seed(4)
    warm = torch.nn.utils.parametrizations.spectral_norm(head)
    assert (warm(x).detach() - outputs[0]).abs().max().item() > 1e-3 * outputs[0].abs().max().item()
