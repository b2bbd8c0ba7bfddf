"""The contract every method and selector keeps, checked for each YAML in conf/method/ and conf/selector/
(a new YAML is covered without touching this file): it trains a few steps on a tiny random model, and a
run interrupted mid-training and resumed ends with the same weights, bit for bit, as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from robustft.config import CONF_DIR
from robustft.errors import Interrupted
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data

pytestmark = needs_data()

METHODS = [f"method={p.stem}" for p in sorted((CONF_DIR / "method").glob("*.yaml"))]
SELECTORS = [f"selector={p.stem}" for p in sorted((CONF_DIR / "selector").glob("*.yaml"))
             if make_cfg([f"selector={p.stem}"]).selector.get("_target_")]  # selector=none selects nothing
TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=16", "task.max_eval_samples=16",
        "trainer.epochs=3", "trainer.batch_size=8", "trainer.eval_every=4", "trainer.log_every=1",
        "trainer.save_every=2", "trainer.precision=fp32", "trainer.max_length=32", "seed=5"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.parametrize("choice", METHODS + SELECTORS)
def test_trains_and_resumes_exactly(choice, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFT_CACHE", str(tmp_path / "cache"))  # reference stages of ftft/cartography
    over = [*TINY, choice]
    full = fit(make_cfg(over), RunDir(tmp_path / "full"))
    assert full["train/steps"] > 2
    with pytest.raises(Interrupted):
        fit(make_cfg([*over, "+trainer.interrupt_at_step=2"]), RunDir(tmp_path / "cut"))
    resumed = fit(make_cfg(over), RunDir(tmp_path / "cut"))
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed["validation/accuracy"] == full["validation/accuracy"]
