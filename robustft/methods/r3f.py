"""R3F and R4F (Aghajanyan et al., ICLR 2021, "Better Fine-Tuning by Reducing Representational Collapse";
official code facebookresearch/fairseq examples/rxf/rxf_src/sentence_prediction_r3f.py).

    loss = CE(f(e), y) + r3f_lambda * [KL(p(e) || p(e + z)) + KL(p(e + z) || p(e))],   z ~ U(-eps, eps) or N(0, eps^2)

e are the word embeddings, z is independent noise on every entry (padding included, as the official code),
the KL is summed over classes and averaged over the batch, in fp32, with gradients through both
distributions in both terms (the official `_get_symm_kl`). As there, the noised forward starts from
e.detach() + z: the word-embedding matrix gets gradients from the clean forward only. Both forwards are in
training mode (independent dropout masks).

R4F = R3F with spectral normalisation of the classification head (`spectral_norm=output`: the Linear that
produces the logits, as the official `--spectral-norm-classification-head` wraps `out_proj`;
`spectral_norm=head` also normalises the head's hidden x hidden dense layer). The normalisation is the
official's `torch.nn.utils.spectral_norm` step for step (`LegacySpectralNorm`, registered as a torch
parametrisation): u, v start as random unit vectors and every training forward runs one power iteration.
torch's `parametrizations.spectral_norm` would differ in the first forwards: it runs 15 power iterations
in its constructor and one in `register_parametrization`'s check (the official none, so its first sigma is a
one-iteration estimate) and iterates u before v.
Checkpoints stay loadable by plain Hugging Face code: the state dict also holds the normalised `weight` under
its usual name (what the evaluation forward uses), beside the parametrisation's own entries (original
weight, `_u`, `_v`, the names torch's parametrisation uses) that a resume reads.

Departures: for regression (STS-B) the divergence is the squared difference of the two outputs (as SMART's
official code); the official criterion adds no term for regression. The noise is drawn on the model's
device from torch's global generator (the official samples on the CPU), so a resume draws the same noise.
`r3f_lambda=0` skips the noised forward: it is vanilla fine-tuning, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from robustft.errors import UserError
from robustft.methods.base import StepOutput, TrainContext, task_loss
from robustft.methods.match_tuning import match_head
from robustft.methods.perturb import (
    PerturbationMethod,
    check_nonnegative,
    divergence,
    embeds_forward,
    word_embeddings,
)

NOISE_TYPES = ("uniform", "normal")
SPECTRAL = ("none", "output", "head")


def output_layer(model: nn.Module) -> nn.Linear:
    """The Linear that produces the logits (RoBERTa: classifier.out_proj; BERT, DeBERTa-v2: classifier)."""
    head = getattr(model, "classifier", None)
    layer = getattr(head, "out_proj", head)
    if not isinstance(layer, nn.Linear):
        raise UserError(f"spectral_norm: no Linear output layer found in {type(model).__name__} (classifier or "
                        "classifier.out_proj); use a BERT-family, RoBERTa or DeBERTa-v2 sequence classifier")
    return layer


class LegacySpectralNorm(nn.Module):
    """W / sigma(W) exactly as `torch.nn.utils.spectral_norm` (the API fairseq's R4F uses), as a parametrisation.

    Registration draws u ~ N(0, I), then v ~ N(0, I), both normalised, and runs no power iteration (torch's
    `parametrizations.spectral_norm` runs 16 there). A training forward runs one iteration
    v <- W^T u / ||W^T u||, u <- W v / ||W v|| in place (so DDP's buffer broadcast keeps it); an evaluation
    forward uses the stored u, v. sigma = u^T W v.
    """

    def __init__(self, weight: torch.Tensor, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps
        h, w = weight.shape
        with torch.no_grad():
            self.register_buffer("_u", F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                F.normalize(torch.mv(weight.t(), self._u), dim=0, eps=self.eps, out=self._v)
                F.normalize(torch.mv(weight, self._v), dim=0, eps=self.eps, out=self._u)
        u, v = self._u.clone(), self._v.clone()  # the in-place update must not touch an earlier forward's graph
        return weight / torch.dot(u, torch.mv(weight, v))


def _plain_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: add `weight` = W / sigma as the evaluation forward uses it (stored u, v; no power step)."""
    sn = module.parametrizations.weight[0]
    training = sn.training
    sn.train(False)
    with torch.no_grad():
        state_dict[prefix + "weight"] = sn(module.parametrizations.weight.original).detach()
    sn.train(training)


def _drop_plain_weight(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: the plain `weight` is derived from the parametrisation's entries; never loaded back."""
    state_dict.pop(prefix + "weight", None)


def spectrally_normalise(model: nn.Module, which: str) -> list[nn.Linear]:
    """Spectral normalisation of the head's Linear layers (`which`: output, or head = output + dense)."""
    layers = [output_layer(model)]
    if which == "head":
        layers.insert(0, match_head(model).dense)
    for layer in layers:
        # unsafe: the safe registration calls the parametrisation once to check it, a power iteration here
        parametrize.register_parametrization(layer, "weight", LegacySpectralNorm(layer.weight), unsafe=True)
        layer.register_state_dict_post_hook(_plain_weight)
        layer.register_load_state_dict_pre_hook(_drop_plain_weight)
    return layers


class R3F(PerturbationMethod):
    """Clean cross-entropy plus the symmetric KL to a forward on noised word embeddings (r3f, r4f)."""

    log_names = ("r3f/kl",)

    def __init__(self, name: str, eps: float, r3f_lambda: float, noise_type: str, spectral_norm: str) -> None:
        super().__init__(name)
        check_nonnegative(eps=eps, r3f_lambda=r3f_lambda)
        if noise_type not in NOISE_TYPES:
            raise UserError(f"method.noise_type={noise_type!r}: choose uniform or normal")
        if spectral_norm not in SPECTRAL:
            raise UserError(f"method.spectral_norm={spectral_norm!r}: choose none, output (R4F) or head")
        self.eps, self.r3f_lambda = float(eps), float(r3f_lambda)
        self.noise_type, self.spectral_norm = noise_type, spectral_norm

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().setup(model, ctx)
        if self.spectral_norm != "none":
            spectrally_normalise(model, self.spectral_norm)
        return model

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """z ~ U(-eps, eps) or N(0, eps^2), drawn in fp32 on the device (the official: `.to(token_embeddings)`)."""
        z = torch.empty(like.shape, device=like.device, dtype=torch.float32)
        z = z.uniform_(-self.eps, self.eps) if self.noise_type == "uniform" else z.normal_(0.0, self.eps)
        return z.to(like.dtype)

    def flops_factor(self) -> float:
        return 1.0 if self.r3f_lambda == 0 else 2.0  # the noised input's forward + backward

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.forward(model, batch)
        regression = self.ctx.task.is_regression
        loss = task_loss(logits, batch["labels"], regression)
        if self.r3f_lambda == 0:
            return StepOutput(loss, logits.detach())
        with torch.no_grad():  # official: token_embeddings.detach().clone() + noise
            embeds = word_embeddings(model, batch)
        noised = embeds_forward(model, batch, embeds + self.noise(embeds))
        kl = divergence(noised, logits, regression)
        self.record(kl)
        return StepOutput(loss + self.r3f_lambda * kl, logits.detach())
