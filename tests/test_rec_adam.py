"""method=rec_adam: the first update by hand, the annealing schedule, AdamW bit for bit without the pull,
state across a resume, the three architectures, and the clear error with selector=rose."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robustft import checkpoint as ckpt
from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, task_loss
from robustft.methods.rec_adam import RecAdam, RecAdamW, anneal_lambda
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import tiny_model
from tests.tiny_models import token_batch as batch

TRAINER = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.01, "log_every": 2})






def rec_adam(**options) -> RecAdam:
    defaults = {"anneal_fun": "sigmoid", "anneal_k": 1.0, "anneal_t0": 2, "anneal_w": 1.0, "pretrain_cof": 5.0}
    return RecAdam("rec_adam", **{**defaults, **options})


def train(method: Method, model: nn.Module, steps: int, opt=None) -> tuple[torch.optim.Optimizer, list[dict]]:
    method.setup(model, TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=TRAINER,
                                     device=torch.device("cpu"), seed=0))
    opt = opt or method.configure_optimizer(model, TRAINER)
    logs = []
    for i in range(steps):
        b = batch(seed=i)
        task_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], False).backward()
        logs.append(method.optimizer_step(opt, model))
        opt.zero_grad(set_to_none=True)
    return opt, logs


def scalar_step(weight_decay: float) -> float:
    theta = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = RecAdamW([{"params": [theta], "weight_decay": weight_decay, "anneal_w": 1.0}], lr=0.1, betas=(0.9, 0.999),
                   eps=1e-8, weight_decay=0.0, anneal_fun="sigmoid", anneal_k=1.0, anneal_t0=1, anneal_w=1.0,
                   pretrain_cof=2.0, foreach=False, fused=False)
    opt.state[theta]["pretrained"].fill_(0.5)  # theta* = 0.5
    theta.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    return theta.item()


def test_first_update_of_a_scalar_by_hand():
    # t = 1, k = 1, t0 = 1: lambda = 1 / (1 + e^0) = 0.5; pull = lr (w - lambda) gamma = 0.1 * 0.5 * 2 = 0.1.
    # Adam's first step is m_hat / (sqrt(v_hat) + eps) = 0.5 / (0.5 + 1e-8) for g = 0.5.
    adam = 0.5 / (0.5 + 1e-8)
    after_adam = 1.0 - 0.1 * 0.5 * adam  # 0.95
    assert math.isclose(scalar_step(0.0), after_adam + 0.1 * (0.5 - after_adam), rel_tol=1e-12)  # 0.905
    decayed = 1.0 * (1 - 0.1 * 0.1)  # weight decay 0.1 with the full lr, first (torch order)
    after_adam = decayed - 0.1 * 0.5 * adam
    assert math.isclose(scalar_step(0.1), after_adam + 0.1 * (0.5 - after_adam), rel_tol=1e-12)  # 0.896


def test_annealing_schedule():
    assert anneal_lambda("sigmoid", 250, 0.5, 250, 1.0) == 0.5
    assert math.isclose(anneal_lambda("sigmoid", 252, 0.5, 250, 1.0), 1 / (1 + math.exp(-1)))
    assert anneal_lambda("sigmoid", 1, 1.0, 1000, 1.0) == 0.0  # exp overflow: 0, as the official np.exp
    assert anneal_lambda("sigmoid", 400, 0.5, 250, 1.0) == 1.0  # annealed: plain AdamW from here on
    assert anneal_lambda("linear", 50, 0.0, 100, 0.8) == 0.4 and anneal_lambda("linear", 200, 0.0, 100, 0.8) == 0.8
    assert anneal_lambda("constant", 7, 0.5, 250, 0.3) == 0.3
    with pytest.raises(UserError, match="anneal_fun"):
        rec_adam(anneal_fun="cosine")


@pytest.mark.parametrize("options", [{"anneal_w": 0.0}, {"anneal_fun": "constant", "pretrain_cof": 0.0}],
                         ids=["anneal_off", "constant_lambda_one"])
def test_without_the_pull_it_is_adamw_bit_for_bit(options):
    """lambda = 1 and no pull: the exact torch.optim.AdamW of vanilla (fused kernel on CPU), step for step."""
    ref_model, model = tiny_model("bert"), tiny_model("bert")
    ref_opt, _ = train(Method("vanilla"), ref_model, 4)
    opt, _ = train(rec_adam(**options), model, 4)
    assert type(ref_opt) is torch.optim.AdamW and ref_opt.defaults["fused"] == opt.defaults["fused"]
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))
    # pretrain_cof = 0 with the sigmoid still scales the task step by lambda(t) (official): not AdamW
    other = tiny_model("bert")
    train(rec_adam(pretrain_cof=0.0), other, 4)
    assert any(not torch.equal(a, b) for a, b in zip(ref_model.parameters(), other.parameters()))


def test_pull_capped_at_the_pretrained_weights():
    """lr * gamma > 1 and lambda(1) = 0: the step lands on theta* exactly (the official update overshoots)."""
    model = tiny_model("bert")
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, logs = train(rec_adam(anneal_k=1.0, anneal_t0=1000, pretrain_cof=5000.0), model, 1)
    assert logs[0]["recadam/lambda"] == 0.0
    backbone = [n for n in pretrained if n.startswith("bert.")]
    head = [n for n in pretrained if not n.startswith("bert.")]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], pretrained[n]) for n in backbone)
    assert all(not torch.equal(params[n], pretrained[n]) for n in head)  # the head: plain AdamW


def test_state_round_trip_continues_exactly():
    """theta* and the step count travel in the optimizer state (through the checkpoint format)."""
    a, b = tiny_model("bert"), tiny_model("bert")
    opt_a, _ = train(rec_adam(), a, 5)
    opt_b, _ = train(rec_adam(), b, 3)
    tensors: dict = {}
    saved = ckpt.unflatten(ckpt.flatten(opt_b.state_dict(), tensors), tensors)
    c = tiny_model("bert", seed=9)  # other initial weights: theta* must come from the state
    c.load_state_dict(b.state_dict())
    method = rec_adam()
    opt_c, _ = train(method, c, 0)
    opt_c.load_state_dict(saved)
    assert [g["recadam_step"] for g in opt_c.param_groups] == [3] * len(opt_c.param_groups)
    for i in range(3, 5):
        bt = batch(seed=i)
        task_loss(c(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits, bt["labels"], False).backward()
        method.optimizer_step(opt_c, c)
        opt_c.zero_grad(set_to_none=True)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_trains_on_each_architecture(arch):
    model = tiny_model(arch)
    opt, logs = train(rec_adam(), model, 4)
    anchored = [p for g in opt.param_groups if g["anneal_w"] > 0 for p in g["params"]]
    prefix = model.base_model_prefix + "."
    assert {id(p) for p in anchored} == {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}
    assert [round(x["recadam/lambda"], 6) for x in logs] == [round(1 / (1 + math.exp(-(t - 2))), 6) for t in (1, 2, 3, 4)]
    assert "recadam/anchor" not in logs[0] and float(logs[1]["recadam/anchor"]) > 0  # on log steps (log_every 2)
    assert float(opt.anchor_distance()) > 0


@needs_data()
def test_rose_refuses_it_with_one_line(tmp_path, tiny_overrides):
    with pytest.raises(UserError, match="ROSE masks AdamW updates; method rec_adam uses RecAdamW"):
        fit(make_cfg([*tiny_overrides, "method=rec_adam", "selector=rose"]), RunDir(tmp_path / "r"))
