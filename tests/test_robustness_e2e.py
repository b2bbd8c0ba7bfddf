"""The runner with robustness evaluators and a stress, end to end on a tiny random BERT (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from robustft.errors import UserError
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data

pytestmark = needs_data()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards on a shared 2-core machine: a second OpenMP thread only adds spin-waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

EVALS = ["'robustness=[advglue,typo,textfooler]'", "robustness.typo.num_examples=6",
         "robustness.textfooler.num_examples=6"]


def test_train_then_evaluate_and_reevaluate_existing_run(tmp_path, tiny_overrides):
    over = [o for o in tiny_overrides if not o.startswith("trainer.epochs")] + ["trainer.epochs=1"]
    cfg = make_cfg([*over, *[e.strip("'") for e in EVALS], "stress=label_noise", "stress.label_noise.rate=0.25"])
    metrics = fit(cfg, RunDir(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("advglue/overall", "advglue/sst2_accuracy", "typo/acc_under_attack", "typo/clean_acc",
                "textfooler/attack_success_rate", "textfooler/avg_queries", "textfooler/n"):
        assert key in saved and key in metrics
    assert saved["typo/n"] == 6 and saved["advglue/n"] == 148
    lines = (tmp_path / "run" / "eval" / "typo" / "samples.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert len(lines) == 6 and {"original", "perturbed", "label", "queries", "status"} <= set(rec)
    assert len((tmp_path / "run" / "eval" / "advglue" / "samples.jsonl").read_text().splitlines()) == 148
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    counts = info["stress"]["counts_before"]
    assert sum(counts.values()) == 64
    assert info["stress"]["label_noise"]["n_flipped"] == sum(int(0.25 * n + 0.5) for n in counts.values())

    # train=false on the finished run: same model, same robustness numbers
    again = fit(make_cfg([*over, "train=false", f"ckpt_path={tmp_path / 'run'}", "robustness=[advglue]"]),
                RunDir(tmp_path / "eval_only"))
    assert again["advglue/overall"] == pytest.approx(saved["advglue/overall"])


def test_misfit_evaluator_fails_before_training(tmp_path, tiny_overrides):
    over = [o for o in tiny_overrides if not o.startswith("task=")]
    with pytest.raises(UserError, match="advglue has no subset for task cola"):
        fit(make_cfg([*over, "task=cola", "robustness=[advglue]"]), RunDir(tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
