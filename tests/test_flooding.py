"""method=flooding, the worked example of adding a method (docs/adding_a_method.md): the formula on hand-computed numbers,
level 0 = vanilla bit for bit, and a real run through the runner."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustft.methods.base import Method, TrainContext
from robustft.methods.flooding import Flooding
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data


class Fixed(nn.Module):
    """A 'model' whose logits are a parameter: the loss is known in closed form."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([logits]))

    def forward(self, **_):
        return type("Out", (), {"logits": self.logits})()


def step(method: Method, logits: list[float], label: int):
    cfg = make_cfg(["task=sst2"])
    method.setup(nn.Identity(), TrainContext(task=cfg.task, trainer=cfg.trainer, device=torch.device("cpu"), seed=0))
    model = Fixed(logits)
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([label])}
    out = method.training_step(model, batch)
    out.loss.backward()
    return out, model.logits.grad


def test_flooding_formula_and_gradient_sign():
    # CE of logits [0, ln 3] with label 1 = -ln(3/4) = 0.2877
    ce = -math.log(3 / 4)
    above, g_above = step(Flooding("flooding", level=0.1), [0.0, math.log(3)], 1)
    assert math.isclose(above.loss.item(), ce, rel_tol=1e-6)  # above b: plain ERM
    below, g_below = step(Flooding("flooding", level=0.5), [0.0, math.log(3)], 1)
    assert math.isclose(below.loss.item(), 2 * 0.5 - ce, rel_tol=1e-6)  # |ce - b| + b = 2b - ce
    _, g_erm = step(Method("vanilla"), [0.0, math.log(3)], 1)
    assert torch.equal(g_above, g_erm) and torch.allclose(g_below, -g_erm)  # below b the step ascends
    assert float(below.logs["flood/below"]) == 1.0 and float(above.logs["flood/below"]) == 0.0


@needs_data()
def test_level_zero_is_vanilla_and_the_method_runs(tmp_path, tiny_overrides):
    vanilla = fit(make_cfg(tiny_overrides), RunDir(tmp_path / "v"))
    zero = fit(make_cfg([*tiny_overrides, "method=flooding", "method.level=0"]), RunDir(tmp_path / "z"))
    assert zero["validation/loss"] == vanilla["validation/loss"]
    # b = 1 is above the tiny model's loss (about ln 2): every step ascends, the run differs from vanilla
    flooded = fit(make_cfg([*tiny_overrides, "method=flooding", "method.level=1.0"]), RunDir(tmp_path / "f"))
    assert flooded["validation/loss"] != vanilla["validation/loss"]
    rows = (tmp_path / "f" / "metrics.jsonl").read_text()
    assert '"flood/below"' in rows
