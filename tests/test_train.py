"""The training loop on a tiny random BERT: determinism, exact resume, early stopping, run files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from robustft.errors import Interrupted, UserError
from robustft.loop import Loop
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data

pytestmark = needs_data()


def weights(path):
    return load_file(str(path / "checkpoints" / "last" / "model.safetensors"))


def test_run_writes_metrics_and_loadable_checkpoints(tmp_path, tiny_overrides):
    run = RunDir(tmp_path)
    metrics = fit(make_cfg(tiny_overrides), run)
    assert 0.0 <= metrics["validation/accuracy"] <= 1.0
    assert metrics["train/steps"] == 16  # 64 examples / 8 per batch * 2 epochs
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["validation/accuracy"] == metrics["validation/accuracy"]
    assert all("/" in k for k in saved)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [4, 8, 12, 16]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(2, 17, 2))
    for name in ("best", "last"):
        folder = tmp_path / "checkpoints" / name
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_labels == 2
    assert (tmp_path / "checkpoints" / "last" / "training_state.safetensors").is_file()


def test_best_checkpoint_is_the_best_eval(tmp_path, tiny_overrides):
    fit(make_cfg(tiny_overrides), RunDir(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "validation"]
    best = max(evals, key=lambda r: r["accuracy"])  # first of equal values wins (strict improvement)
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert final["best/step"] == best["step"]
    assert final["validation/accuracy"] == pytest.approx(best["accuracy"])


def test_same_seed_same_result_and_other_seed_differs(tmp_path, tiny_overrides):
    a = fit(make_cfg(tiny_overrides), RunDir(tmp_path / "a"))
    b = fit(make_cfg(tiny_overrides), RunDir(tmp_path / "b"))
    c = fit(make_cfg([*tiny_overrides, "seed=7"]), RunDir(tmp_path / "c"))
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["validation/loss"] == b["validation/loss"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert c["validation/loss"] != a["validation/loss"]


@pytest.mark.parametrize("stop_at", [3, 8])  # mid-epoch (between saves) and at an epoch boundary
def test_resume_equals_uninterrupted_run(tmp_path, tiny_overrides, stop_at):
    full = fit(make_cfg(tiny_overrides), RunDir(tmp_path / "full"))
    with pytest.raises(Interrupted):
        fit(make_cfg([*tiny_overrides, f"+trainer.interrupt_at_step={stop_at}"]), RunDir(tmp_path / "cut"))
    resumed = fit(make_cfg(tiny_overrides), RunDir(tmp_path / "cut"))  # resume=auto finds checkpoints/last
    w_full, w_res = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    for key in ("validation/accuracy", "validation/loss", "best/step", "train/steps", "cost/train_tokens"):
        assert resumed[key] == full[key], key


def timeless(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith(("wall_s", "per_s"))}


def test_keep_checkpoints_prunes_only_a_scored_run(tmp_path, tiny_overrides):
    """best keeps checkpoints/best, none the records only, with the same metrics. An interrupted run keeps
    checkpoints/last whatever the option, resumes from it, and is pruned when it ends."""
    full = fit(make_cfg(tiny_overrides), RunDir(tmp_path / "all"))
    for keep in ("best", "none"):
        metrics = fit(make_cfg([*tiny_overrides, f"trainer.keep_checkpoints={keep}"]), RunDir(tmp_path / keep))
        assert timeless(metrics) == timeless(full), keep
        assert (tmp_path / keep / "metrics.json").is_file() and (tmp_path / keep / "run_info.json").is_file()
    assert sorted(p.name for p in (tmp_path / "all" / "checkpoints").iterdir()) == ["best", "last"]
    assert sorted(p.name for p in (tmp_path / "best" / "checkpoints").iterdir()) == ["best"]
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "best" / "checkpoints" / "best")
    assert not (tmp_path / "none" / "checkpoints").exists()

    none = [*tiny_overrides, "trainer.keep_checkpoints=none"]
    with pytest.raises(Interrupted):
        fit(make_cfg([*none, "+trainer.interrupt_at_step=3"]), RunDir(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoints" / "last" / "training_state.safetensors").is_file()
    resumed = fit(make_cfg(none), RunDir(tmp_path / "cut"))
    assert timeless(resumed) == timeless(full)
    assert not (tmp_path / "cut" / "checkpoints").exists()


def curves(run_dir) -> list[dict]:
    """metrics.jsonl rows without the wall-clock rates."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


@pytest.mark.parametrize("kill_at, rows_before", [(2, [2]), (5, [2, 4])], ids=["before-first-save", "between-saves"])
def test_curves_survive_a_kill_and_resume(tmp_path, tiny_overrides, monkeypatch, kill_at, rows_before):
    """A kill between checkpoints (kill -9: no save), also before the first one, and a resume give the
    uninterrupted run's metrics.jsonl: no row logged after the last checkpoint is duplicated and the loss
    window carries over. resume=never on the finished folder starts a clean record."""
    over = [*tiny_overrides, "trainer.log_every=2", "trainer.save_every=3", "trainer.eval_every=50",
            "trainer.max_steps=8"]
    fit(make_cfg(over), RunDir(tmp_path / "full"))

    class Killed(BaseException):
        pass

    original = Loop.maybe_evaluate_and_save

    def kill(self, epoch_end):
        stop = original(self, epoch_end)
        if self.state.step == kill_at:  # saves at steps 3 and 6, train rows at 2, 4, 6, 8
            raise Killed
        return stop

    monkeypatch.setattr(Loop, "maybe_evaluate_and_save", kill)
    with pytest.raises(Killed):
        fit(make_cfg(over), RunDir(tmp_path / "cut"))
    assert [r["step"] for r in curves(tmp_path / "cut")] == rows_before
    monkeypatch.setattr(Loop, "maybe_evaluate_and_save", original)
    fit(make_cfg(over), RunDir(tmp_path / "cut"))
    assert curves(tmp_path / "cut") == curves(tmp_path / "full")
    # resume=never on the finished folder, killed again: the rerun resumes this attempt, not the old one
    monkeypatch.setattr(Loop, "maybe_evaluate_and_save", kill)
    with pytest.raises(Killed):
        fit(make_cfg([*over, "resume=never"]), RunDir(tmp_path / "cut"))
    assert [r["step"] for r in curves(tmp_path / "cut")] == rows_before
    assert not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(Loop, "maybe_evaluate_and_save", original)
    fit(make_cfg(over), RunDir(tmp_path / "cut"))
    assert curves(tmp_path / "cut") == curves(tmp_path / "full")


def test_non_finite_loss_stops_the_run_with_one_line(tmp_path, tiny_overrides):
    with pytest.raises(UserError, match=r"training loss is (nan|inf) at step \d+; lower trainer.lr"):
        fit(make_cfg([*tiny_overrides, "trainer.lr=1e30", "trainer.warmup_ratio=0"]), RunDir(tmp_path))


def test_early_stopping_stops_after_patience(tmp_path, tiny_overrides):
    # lr 0 never improves on the first eval: with patience 2 the run stops at the 3rd eval (step 12)
    cfg = make_cfg([*tiny_overrides, "trainer.lr=0.0", "trainer.early_stopping_patience=2", "trainer.epochs=5"])
    metrics = fit(cfg, RunDir(tmp_path))
    assert metrics["train/steps"] == 12
    assert metrics["train/stopped_early"] == 1.0
    assert metrics["best/step"] == 4


def test_grad_accumulation_counts_optimizer_steps(tmp_path, tiny_overrides):
    metrics = fit(make_cfg([*tiny_overrides, "trainer.grad_accum=2", "trainer.epochs=1"]), RunDir(tmp_path))
    assert metrics["train/steps"] == 4 and metrics["train/examples"] == 64


def test_regression_task_trains(tmp_path, tiny_overrides):
    over = [o for o in tiny_overrides if not o.startswith("task=")] + ["task=stsb"]
    metrics = fit(make_cfg(over), RunDir(tmp_path))
    assert "validation/pearson" in metrics and "validation/combined_score" in metrics


def test_training_dynamics_files_and_resume(tmp_path, tiny_overrides):
    over = [*tiny_overrides, "trainer.record_dynamics=true"]
    fit(make_cfg(over), RunDir(tmp_path / "full"))
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "+trainer.interrupt_at_step=3"]), RunDir(tmp_path / "cut"))
    fit(make_cfg(over), RunDir(tmp_path / "cut"))
    for epoch in (0, 1):
        name = f"training_dynamics/dynamics_epoch_{epoch}.jsonl"
        rows = [json.loads(line) for line in (tmp_path / "full" / name).read_text().splitlines()]
        assert len(rows) == 64 and set(rows[0]) == {"guid", f"logits_epoch_{epoch}", "gold"}
        assert sorted(r["guid"] for r in rows) == sorted({r["guid"] for r in rows})
        assert len(rows[0][f"logits_epoch_{epoch}"]) == 2
        # the resumed run (cut mid-epoch 0) writes the same records
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "full" / name).read_text()
