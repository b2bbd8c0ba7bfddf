"""method=lora: the update formula, the trainable parameter count, frozen weights, plain checkpoints that
reproduce the run's metrics, resume, the three architecture families and composition with selector=rose.

Resume of method=lora alone is tests/test_method_contract.py's (every YAML)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from robustft import checkpoint as ckpt
from robustft.errors import Interrupted, UserError
from robustft.methods.base import TrainContext
from robustft.methods.lora import Lora, plain_name
from robustft.methods.rose import Rose
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import one_thread  # noqa: F401  (module fixture)
from tests.tiny_models import tiny_model as tiny

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, LABELS = 50, 8, 2
YAML = Path(__file__).resolve().parents[1] / "robustft" / "conf" / "method" / "lora.yaml"
# the adapted modules of each family (peft's per-architecture defaults) and its head's parameter count
TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"), "deberta": ("query_proj", "value_proj")}
HEAD_PARAMS = {
    "bert": HIDDEN * LABELS + LABELS,  # classifier (bert.pooler is pretrained: frozen)
    "roberta": (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * LABELS + LABELS),  # classifier.dense, classifier.out_proj
    "deberta": (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * LABELS + LABELS),  # pooler.dense, classifier
}




def lora(**overrides) -> Lora:
    """The method with its YAML's options (the one place defaults live) and `overrides`.

    Built directly, not through hydra's instantiate, which wraps a UserError in an InstantiationException.
    """
    options = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(YAML)).items() if k != "_target_"}
    return Lora(**{**options, **overrides})




def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    return tiny(arch, hidden=HIDDEN, labels=LABELS, seed=seed).eval()  # vocab 60 >= the batches' 50


def ctx() -> TrainContext:
    trainer = OmegaConf.create({"log_every": 1, "lr": 1e-3, "weight_decay": 0.01})
    return TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=trainer, device=torch.device("cpu"),
                        seed=0)


def batch(seed: int = 1, n: int = 6, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, LABELS, (n,), generator=g)}


def train_steps(method: Lora, model: nn.Module, steps: int) -> list[float]:
    opt = method.configure_optimizer(model, method.ctx.trainer)
    losses = []
    for _ in range(steps):
        out = method.training_step(model, batch())
        out.loss.backward()
        method.optimizer_step(opt, model)
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def attention(model: nn.Module, layer: int) -> nn.Module:
    return model.get_base_model().base_model.encoder.layer[layer].attention.self


# --- the formula --------------------------------------------------------------------------------------
def test_update_is_alpha_over_r_times_b_a_and_merges_into_the_checkpoint(tmp_path):
    method = lora(r=2, alpha=6.0)  # scale 3
    model = method.setup(tiny_model("bert"), ctx())
    query = attention(model, 0).query
    w0, b0 = query.base_layer.weight.detach().clone(), query.base_layer.bias.detach().clone()
    a = torch.zeros(2, HIDDEN)
    a[0, 0], a[1, 1] = 1.0, -2.0  # A x = (x_0, -2 x_1)
    b = torch.zeros(HIDDEN, 2)
    b[3, 0], b[5, 1] = 0.5, 1.0  # B A x puts 0.5 x_0 in row 3 and -2 x_1 in row 5
    with torch.no_grad():
        query.lora_A["default"].weight.copy_(a)
        query.lora_B["default"].weight.copy_(b)
    x = torch.randn(4, HIDDEN)
    expected = x @ w0.T + b0
    expected[:, 3] += 3 * 0.5 * x[:, 0]
    expected[:, 5] += 3 * -2.0 * x[:, 1]
    torch.testing.assert_close(query(x), expected)
    ckpt.save_checkpoint(tmp_path / "c", model, None, None)
    merged = load_file(str(tmp_path / "c" / "model.safetensors"))
    delta = torch.zeros(HIDDEN, HIDDEN)
    delta[3, 0], delta[5, 1] = 1.5, -6.0
    torch.testing.assert_close(merged["bert.encoder.layer.0.attention.self.query.weight"], w0 + delta)


# --- trainable parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
@pytest.mark.parametrize("r", [1, 4])
def test_trainable_params_are_r_times_d_in_plus_d_out_per_target_plus_the_head(arch, r):
    plain = tiny_model(arch)
    total = sum(p.numel() for p in plain.parameters())
    method = lora(r=r)
    model = method.setup(plain, ctx())
    modules = 2 * len(TARGETS[arch])  # 2 layers x (W_q, W_v), each d_in = d_out = HIDDEN
    expected = modules * r * (HIDDEN + HIDDEN) + HEAD_PARAMS[arch]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert method.info["trainable_params"] == expected and method.info["trainable_frac"] == expected / total
    assert method.info["target_modules"] == sorted(TARGETS[arch])
    lora_names = [n for n in trained if ".lora_" in n]
    assert len(lora_names) == 2 * modules and all(n.split(".lora_")[0].endswith(TARGETS[arch]) for n in lora_names)
    assert all(".modules_to_save." in n for n in trained if ".lora_" not in n)  # the rest is the head


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_plain_names_are_the_hf_models_keys(arch):
    plain = tiny_model(arch)
    keys = set(plain.state_dict())
    model = lora().setup(plain, ctx())
    assert {plain_name(k) for k in model.state_dict()} - {None} == keys


# --- training, frozen weights, plain checkpoints: every family ----------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_training_moves_only_adapters_and_head_and_checkpoints_are_plain(arch, tmp_path):
    reference = tiny_model(arch)
    method = lora(r=2, lr=1e-2, weight_decay=0.0)
    model = method.setup(tiny_model(arch), ctx())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(method, model, 8)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n  # A, B and the head moved
        else:
            assert torch.equal(p, before[n]), n  # frozen: bit for bit
    ckpt.save_checkpoint(tmp_path / "c", model, None, None)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c", attn_implementation="eager").eval()
    model.eval()
    x = {k: v for k, v in batch(seed=7).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(plain(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-6)
    saved, original = load_file(str(tmp_path / "c" / "model.safetensors")), reference.state_dict()
    assert saved.keys() == original.keys()
    head = tuple(method.info["modules_to_save"])
    for k, v in saved.items():
        if k.endswith(tuple(f"{t}.weight" for t in TARGETS[arch])):
            assert torch.linalg.matrix_rank(v - original[k]) <= 2, k  # W0 + a rank-r update
        elif not k.startswith(head):
            assert torch.equal(v, original[k]), k  # everything else is the pretrained model's
    # loading the plain checkpoint back (the loop's restore of checkpoints/best) gives exactly that model
    fresh = lora(r=2).setup(tiny_model(arch, seed=3), ctx()).eval()
    fresh.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, plain(**x).logits)


def test_resume_state_restores_the_unmerged_factors(tmp_path):
    """As the loop resumes: checkpoints/last's merged model file first, then the method's state."""
    method = lora(r=2, lr=1e-2)
    model = method.setup(tiny_model("bert"), ctx())
    train_steps(method, model, 3)
    ckpt.save_checkpoint(tmp_path / "last", model, None, {"method": method.state_dict()})
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(load_file(str(tmp_path / "last" / "model.safetensors")), strict=False)
    changed = [k for k in want if not torch.equal(want[k], model.state_dict()[k])]
    assert changed and all(".lora_B." in k or ".base_layer." in k for k in changed)  # merged W, B = 0
    method.load_state_dict(ckpt.load_training_state(tmp_path / "last")["method"])
    got = model.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


# --- options ----------------------------------------------------------------------------------------
def test_lr_and_weight_decay_override_the_trainer_only_when_set():
    method = lora(lr=5e-4, weight_decay=0.1)
    opt = method.configure_optimizer(method.setup(tiny_model("bert"), ctx()), ctx().trainer)
    assert {g["lr"] for g in opt.param_groups} == {5e-4} and opt.param_groups[0]["weight_decay"] == 0.1
    method = lora(lr=None, weight_decay=None)
    opt = method.configure_optimizer(method.setup(tiny_model("bert"), ctx()), ctx().trainer)
    assert {g["lr"] for g in opt.param_groups} == {1e-3} and opt.param_groups[0]["weight_decay"] == 0.01


def test_explicit_targets_and_head_override_the_defaults():
    method = lora(r=1, target_modules=["key"], modules_to_save=["classifier", "bert.pooler"])
    model = method.setup(tiny_model("bert"), ctx())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert method.info["target_modules"] == ["key"] and all(".key." in n for n in trained if ".lora_" in n)
    assert any("bert.pooler.modules_to_save" in n for n in trained)


@pytest.mark.parametrize("overrides", [{"r": 0}, {"r": 2.5}, {"alpha": 0}, {"dropout": 1.0}, {"lr": 0.0},
                                       {"weight_decay": -1.0}, {"target_modules": "query"}, {"modules_to_save": []}])
def test_bad_options_are_user_errors(overrides):
    with pytest.raises(UserError):
        lora(**overrides)


@pytest.mark.parametrize("overrides", [{"target_modules": ["nope"]}, {"modules_to_save": ["nope"]}])
def test_unknown_modules_are_user_errors(overrides):
    with pytest.raises(UserError, match="nope"):
        lora(**overrides).setup(tiny_model("bert"), ctx())


def test_rose_selects_among_the_adapter_factors():
    options = OmegaConf.to_container(make_cfg(["selector=rose", "selector.variant=second"]).selector)
    method = Rose(**{k: v for k, v in options.items() if k != "_target_"}, inner=lora())
    model = method.setup(tiny_model("roberta"), ctx())
    method.configure_optimizer(model, ctx().trainer)
    assert len(method.eligible_names) == 8 and all(".lora_" in n for n in method.eligible_names)


# --- end to end -------------------------------------------------------------------------------------
@needs_data()
def test_best_checkpoint_is_a_plain_model_with_the_runs_final_metrics(tmp_path, tiny_overrides):
    final = fit(make_cfg([*tiny_overrides, "method=lora"]), RunDir(tmp_path / "run"))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["lora"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lora/trainable_frac"] == info["trainable_frac"] for r in rows if r["split"] == "train")
    assert final["lora/trainable_params"] == info["trainable_params"] < 0.01 * info["total_params"]
    # the best checkpoint evaluated as a plain HF model (train=false, method=vanilla)
    best = tmp_path / "run" / "checkpoints" / "best"
    plain = fit(make_cfg([*tiny_overrides, "train=false", f"ckpt_path={best}"]), RunDir(tmp_path / "eval"))
    assert plain["validation/accuracy"] == final["validation/accuracy"]
    assert plain["validation/loss"] == final["validation/loss"]
    assert final["best/step"] < final["train/steps"]  # (so the final evaluation did restore an earlier model)
    best_row = next(r for r in rows if r["split"] == "validation" and r["step"] == final["best/step"])
    assert best_row["accuracy"] == final["validation/accuracy"]  # the final model is the best step's


@needs_data()
def test_best_weights_kept_in_memory_without_checkpoints(tmp_path, tiny_overrides):
    final = fit(make_cfg([*tiny_overrides, "method=lora", "trainer.save_checkpoints=false"]), RunDir(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best_row = next(r for r in rows if r["split"] == "validation" and r["step"] == final["best/step"])
    assert final["best/step"] < final["train/steps"] and best_row["loss"] == final["validation/loss"]


@needs_data()
def test_lora_with_rose_trains_and_resumes_exactly(tmp_path, tiny_overrides):
    over = [*tiny_overrides, "trainer.epochs=1", "method=lora", "selector=rose", "selector.variant=second"]
    full = fit(make_cfg(over), RunDir(tmp_path / "full"))
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all("lora/trainable_frac" in r and 0 < r["rose/updated_frac"] <= 1 for r in train)
    assert any(r["rose/updated_frac"] < 1 for r in train)  # ROSE froze some adapter factors
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "+trainer.interrupt_at_step=3"]), RunDir(tmp_path / "cut"))
    resumed = fit(make_cfg(over), RunDir(tmp_path / "cut"))
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed["validation/loss"] == full["validation/loss"]
