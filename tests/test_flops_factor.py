"""`cost/train_flops` counts a method's extra passes: 6 x non-embedding params x tokens x `flops_factor()`.

The factors are written out by hand from the convention in `Method.flops_factor` (forward 1/3, backward
2/3 of which 1/3 is the weight gradients); the run-level check trains vanilla and R3F on the same data and
expects exactly twice the FLOPs."""

from __future__ import annotations

import pytest

from robustft.methods.base import build_method
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg, needs_data

pytestmark = needs_data()

EXPECTED = [
    (["method=vanilla"], 1.0),
    (["method=match_tuning"], 1.0),
    (["method=mixout"], 1.0),
    (["method=rec_adam"], 1.0),
    (["method=r3f"], 2.0),                                           # clean + noised forward/backward
    (["method=r3f", "method.r3f_lambda=0"], 1.0),                    # no noised pass at lambda 0
    (["method=r4f"], 2.0),
    (["method=r_drop"], 2.0),                                        # the doubled batch
    (["method=smart"], 1 + 2 / 3 + 1),                               # k=1: clean, ascent (fwd + input grad), adv
    (["method=smart", "method.k=2", "method.mu=1"], 1 + 4 / 3 + 1 + 1 / 3),  # + EMA forward
    (["method=smart", "method.alpha=0", "method.mu=0"], 1.0),
    (["method=freelb", "method.adv_steps=3"], 3.0),
    (["arm=freelb_plus_plus"], 10.0),                                # FreeLB++: K=10
    (["method=pgd"], 1 + 4 / 3),                                     # K=2 ascent (fwd + input grad), adv pass
    (["method=pgd", "method.adv_steps=5"], 1 + 10 / 3),
    (["method=tavat"], 2.0),                                         # K=2 forward + backward passes
    (["method=infobert"], 4.0),                                      # K=3 x (fwd, ascent input grad, full bwd)
    (["method=lora"], 2 / 3),                                        # no weight gradients for frozen weights
    (["method=rose", "method.variant=first"], 10 / 3),
    (["method=rose", "method.variant=second"], 1.0),
    (["method=rose", "method.variant=ensemble"], 10 / 3),
    (["method=r3f", "selector=rose", "selector.variant=second"], 2.0),  # second: the wrapped method's step
    (["method=r_drop", "selector=child_tuning", "selector.variant=f"], 2.0),
]


@pytest.mark.parametrize(("overrides", "factor"), EXPECTED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_flops_factor_by_hand(overrides, factor):
    assert build_method(make_cfg(overrides)).flops_factor() == pytest.approx(factor, rel=1e-12)


def test_r3f_run_reports_twice_vanilla_flops(tmp_path, tiny_overrides):
    over = [*tiny_overrides, "trainer.epochs=1", "trainer.save_checkpoints=false", "seed=3"]
    vanilla = fit(make_cfg([*over, "method=vanilla"]), RunDir(tmp_path / "v"))
    r3f = fit(make_cfg([*over, "method=r3f"]), RunDir(tmp_path / "r"))
    assert r3f["cost/train_tokens"] == vanilla["cost/train_tokens"] > 0  # same batches, same tokens
    assert r3f["cost/train_flops"] == 2 * vanilla["cost/train_flops"]
    assert r3f["cost/total_flops"] == r3f["cost/train_flops"]
