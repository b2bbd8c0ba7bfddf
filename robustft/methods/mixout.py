"""Mixout (Lee, Cho & Kang, ICLR 2020; official code bloodwass/mixout): dropout toward the pretrained weights.

In training, every forward of a mixed linear layer draws one Bernoulli(1 - p) mask m over its INPUT
features (one value per column of W: "all outgoing parameters of a neuron", the same mask for every row
and for the whole batch) and multiplies the input by

    W~ = ((1 - m) * W0 + m * W - p * W0) / (1 - p) = W0 + m / (1 - p) * (W - W0)

where W0 is the layer's weight when the method was set up (the pretrained weight; for the newly
initialised classification head, its initialisation). E[W~] = W, like dropout, which is mixout toward
0 (W0 = 0). Biases are not mixed. In evaluation the layer is the plain linear layer W.

Which layers (the official `example_huggingface.py`): every `nn.Linear` of the model (attention Q/K/V
and output, FFN in/out, pooler, classification head) is mixed, and every `nn.Dropout` is set to p = 0
(`zero_dropout=true`; with `zero_dropout=false` the model keeps its dropout). p = 0 leaves the linear
layers plain, so `p=0 zero_dropout=false` is vanilla fine-tuning bit for bit.

Checkpoints stay plain HF models: `MixoutLinear` is an `nn.Linear` (subclass) that reuses the wrapped
layer's `weight`/`bias` Parameters and holds W0 as a non-persistent buffer, so the state dict has the
same keys and `save_pretrained` folders load with AutoModelForSequenceClassification. A resume restores
W from the checkpoint; W0 is re-taken from the model the run starts from (the same pretrained weights).

Kept from the official code, though it departs from the math: the gradient is dL/dW = dL/dW~ * m
(`Mixout.backward` returns grad * noise), without the 1 / (1 - p) of the forward's derivative.
Departures: the mixed weight is computed as W0 + m / (1 - p) (W - W0) in one `torch.lerp` (the official
expression's value up to rounding); p = 1 (the layer is always W0, it cannot train) is refused.
Logs: run_info.json `mixout` (p, mixed layers, dropout modules set to 0), and `mixout/dist` =
sum ||W - W0||^2 over the mixed layers in the train rows. Cost: a few passes over each weight per
forward, and autograd keeps each layer's W~ until the backward (one weight-sized tensor per layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext


class _MixoutWeight(torch.autograd.Function):
    """W~ = W0 + mask / (1 - p) * (W - W0); backward: dL/dW = dL/dW~ * mask (the official gradient)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return torch.lerp(target, weight, mask * (1.0 / (1.0 - p)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        # official `Mixout.backward`: grad_output * noise (no 1 / (1 - p) factor)
        return grad * mask, None, None, None


def mixout_weight(weight: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """The mixed weight for a given input-feature mask (shape (1, in_features), values 0/1)."""
    return _MixoutWeight.apply(weight, target, mask, p)


def draw_mask(weight: torch.Tensor, p: float) -> torch.Tensor:
    """One Bernoulli(1 - p) value per input feature (column of W), from the global torch RNG (resumable)."""
    return torch.empty((1, weight.shape[1]), dtype=weight.dtype, device=weight.device).bernoulli_(1.0 - p)


class MixoutLinear(nn.Linear):
    """An nn.Linear whose weight is mixed toward its set-up value W0 in training (see the module docstring).

    Built from an existing layer: same `weight`/`bias` Parameters (state dict keys unchanged), W0 a
    non-persistent buffer (never saved).
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the wrapped layer's Parameters are reused
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("weight0", linear.weight.detach().clone(), persistent=False)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:  # official: the plain weight
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, mixout_weight(self.weight, self.weight0, draw_mask(self.weight, self.p), self.p), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mixout={self.p}"


def apply_mixout(model: nn.Module, p: float, zero_dropout: bool) -> dict[str, int]:
    """Replace every nn.Linear by a MixoutLinear (in place) and, with `zero_dropout`, set every nn.Dropout's
    p to 0 (official example_huggingface.py); returns the counts."""
    linear = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, module in linear:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, MixoutLinear(module, p))
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if zero_dropout:
        for m in dropouts:
            m.p = 0.0  # attention dropout too: HF attention reads its module's p (eager and SDPA)
    return {"layers": len(linear), "dropout_zeroed": len(dropouts) if zero_dropout else 0}


class Mixout(Method):
    """Vanilla fine-tuning with mixout(W0, p) on every linear layer instead of dropout."""

    def __init__(self, name: str, p: float, zero_dropout: bool) -> None:
        super().__init__(name)
        if not 0.0 <= float(p) < 1.0:
            raise UserError(f"method.p={p} must be in [0, 1) (mix probability; 0 = plain layers, official runs 0.7-0.9)")
        self.p, self.zero_dropout = float(p), bool(zero_dropout)
        self.info: dict[str, Any] = {}
        self.layers: list[MixoutLinear] = []
        self.log_every, self.steps = 1, 0

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().setup(model, ctx)
        counts = apply_mixout(model, self.p, self.zero_dropout)
        if counts["layers"] == 0:
            mtype = getattr(getattr(model, "config", None), "model_type", None)
            raise UserError(f"method=mixout found no nn.Linear layer in model_type={mtype!r} ({type(model).__name__}); "
                            "use a transformer model (minilm, bert, roberta, deberta)")
        self.layers = [m for m in model.modules() if isinstance(m, MixoutLinear)]
        self.log_every = max(1, int(ctx.trainer.log_every))
        mixed, total = sum(m.weight.numel() for m in self.layers), sum(p.numel() for p in model.parameters())
        self.info = {"p": self.p, "zero_dropout": self.zero_dropout, **counts, "mixed_param_frac": mixed / total}
        return model

    def run_info(self) -> dict[str, Any]:
        """Recorded once in run_info.json: p, the mixed layers, the dropout modules set to 0."""
        return {"mixout": self.info}

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
        """mixout/dist: sum ||W - W0||^2 over the mixed layers (how far mixout lets them drift), computed on
        the steps that write a train row only (one pass over the weights; a device tensor)."""
        logs = super().optimizer_step(optimizer, model)
        self.steps += 1
        if self.steps % self.log_every:
            return logs
        with torch.no_grad():
            diffs = torch._foreach_sub([m.weight for m in self.layers], [m.weight0 for m in self.layers])
            return {**logs, "mixout/dist": torch.stack(torch._foreach_norm(diffs)).float().square().sum()}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
