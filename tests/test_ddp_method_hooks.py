"""Method hooks on a 2-process gloo group, called directly on tiny models (no loop): what must be identical
across ranks is, and equals one process on the concatenated global batch.

DDP is played by hand where a step needs it: each rank back-propagates its shard's loss scaled by
(shard size / global batch) and the gradients are summed over the ranks, the global-batch mean gradient,
what ddp-core's DistributedDataParallel step hands the optimizer. All scenarios run in one spawned pair of
processes (a module fixture), each test checks one of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from robustft import distributed as D
from robustft.dynamics import TrainingDynamics
from robustft.errors import UserError
from robustft.methods.base import LoopHandle, StepOutput, TrainContext, instantiate_method, task_loss
from robustft.methods.child_tuning import ChildTuning
from robustft.methods.flooding import Flooding
from robustft.methods.vanilla import Vanilla
from tests.ddp_helpers import run_ranks
from tests.tiny_models import tiny_model, token_batch

CONF = Path(__file__).resolve().parents[1] / "robustft" / "conf"
TRAINER = OmegaConf.create({"log_every": 1, "lr": 1e-2, "weight_decay": 0.01, "batch_size": 4,
                            "group_by_length": False, "max_grad_norm": 0.05})
N = 10  # the global batch (shards of 5 and 5); uneven shards are covered by the dynamics scenario


def ctx() -> TrainContext:
    return TrainContext(task=OmegaConf.create({"is_regression": False}), trainer=TRAINER, device=torch.device("cpu"),
                        seed=3, tokenizer=PadTokenizer())


def global_batch() -> dict[str, torch.Tensor]:
    return {**token_batch(n=N, length=7, seed=5), "idx": torch.arange(N)}


def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    a, b = D.shard_bounds(N)
    return {k: v[a:b] for k, v in batch.items()}


def ddp_backward(loss: torch.Tensor, n: int, params: list[torch.nn.Parameter]) -> None:
    """What DDP leaves in .grad: the global-batch mean gradient (the shard's loss weighted by its share)."""
    (loss * n / N).backward()
    for p in params:
        if p.grad is not None:
            p.grad.copy_(D.all_reduce_sum(p.grad))


class IdxNoise(Vanilla):
    """Stands in for dropout in ROSE's two passes: each pass shifts every example's logits by an amount fixed by
    (example idx, pass), so a shard sees exactly what the whole batch sees, unlike a random dropout mask."""

    def __init__(self) -> None:
        super().__init__(name="vanilla")
        self.calls = 0

    def forward(self, model, batch):
        self.calls += 1
        shift = torch.sin(batch["idx"].float()[:, None] * 1.7 + self.calls * torch.tensor([0.3, 2.1]))
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits + shift


class PadTokenizer:
    """`tokenizer.pad` as collate uses it: right-pad input_ids with 0, attention_mask with 0."""

    def pad(self, feats, return_tensors="pt"):
        n = max(len(x) for x in feats["input_ids"])
        return {k: torch.tensor([list(x) + [0] * (n - len(x)) for x in v]) for k, v in feats.items()}


# --- the scenarios (every rank; the single process: the same function with world size 1) ---------------
def rose_steps(variant: str) -> dict:
    """Two ROSE steps on the global batch (sharded under DDP): masks, scores, KL and the weights after."""
    node = OmegaConf.merge(OmegaConf.load(CONF / "method" / "rose.yaml"), {"variant": variant, "start_step": 0})
    rose = instantiate_method(node, "method")
    rose.inner = IdxNoise()
    model = tiny_model(hidden=16, intermediate=32, seed=1)
    rose.setup(model, ctx())
    opt = rose.configure_optimizer(model, TRAINER)
    out = {"masks": [], "scores": [], "kl": []}
    for _ in range(2):
        batch = shard(global_batch())
        step = rose.training_step(model, batch)
        out["scores"].append(None if rose._kl_scores is None else rose._kl_scores.clone())
        out["kl"].append(None if rose._kl_sum is None else rose._kl_sum.clone())
        ddp_backward(step.loss, len(batch["idx"]), list(model.parameters()))
        out["masks"].append(rose.masks(opt)["final"])
        rose.optimizer_step(opt, model)
        opt.zero_grad(set_to_none=True)
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def child_d_mask() -> dict:
    """ChildTuning-D's Fisher pass over a 10-example set (batches of 4: 3 batches, split 2/1 under DDP)."""
    g = torch.Generator().manual_seed(7)
    lengths = [5, 9, 6, 7, 8, 5, 9, 6, 7, 8]
    train = Dataset.from_dict({"input_ids": [torch.randint(5, 60, (n,), generator=g).tolist() for n in lengths],
                               "attention_mask": [[1] * n for n in lengths], "label": [i % 2 for i in range(10)],
                               "idx": list(range(10))})
    model = tiny_model(hidden=16, intermediate=32, seed=2)
    method = ChildTuning(name="child_tuning", variant="d", reserve_p=0.3,
                         eligible={"contains": ["layer"], "excludes": []}, inner=Vanilla(name="vanilla"))
    method.setup(model, ctx())
    method.configure_optimizer(model, TRAINER)
    rows: list[dict] = []
    method.run_fisher(model, train, LoopHandle(log=rows.append, save=lambda: None))
    return {"mask": [m.clone() for m in method.mask], "fisher": dict(method.fisher), "logged": rows}


def child_f_masks() -> dict:
    """Two F steps, and the second step's mask again after a resume from the first."""
    def build() -> ChildTuning:
        m = ChildTuning(name="child_tuning", variant="f", reserve_p=0.3, eligible={"contains": ["layer"], "excludes": []},
                        inner=Vanilla(name="vanilla"))
        model = tiny_model(hidden=16, intermediate=32, seed=2)
        m.setup(model, ctx())
        return m, model, m.configure_optimizer(model, TRAINER)

    method, model, opt = build()
    torch.manual_seed(100 + D.rank())  # the ranks' global RNG streams differ, as after a few dropout draws
    masks, state = [], None
    for step in range(2):
        for p in method.params:
            p.grad = torch.ones_like(p)
        masks.append([p.grad.clone() for p in method.params])  # the buffer is drawn in place in optimizer_step
        method.optimizer_step(opt, model)
        masks[-1] = [p.grad.clone() for p in method.params]  # ones x mask / p: the step's mask
        if step == 0:
            state = method.state_dict()
    resumed, model2, opt2 = build()
    resumed.load_state_dict(state)
    for p in resumed.params:
        p.grad = torch.ones_like(p)
    resumed.optimizer_step(opt2, model2)
    return {"masks": masks, "resumed": [p.grad.clone() for p in resumed.params]}


def flooding_grads() -> dict:
    """Flooding with b between shard 0's loss and the global loss: the sign must be the global batch's."""
    model = tiny_model(hidden=16, intermediate=32, seed=4)
    batch = global_batch()
    with torch.no_grad():
        def loss_of(b):
            return float(task_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   b["labels"], False))
        first, whole = loss_of({k: v[:5] for k, v in batch.items()}), loss_of(batch)
    level = (first + whole) / 2  # shard 0 alone floods the other way than the global batch
    method = Flooding(name="flooding", level=level)
    method.setup(model, ctx())
    part = shard(batch)
    out: StepOutput = method.training_step(model, part)
    ddp_backward(out.loss, len(part["idx"]), list(model.parameters()))
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "below": out.logs["flood/below"],
            "first_vs_whole": (first, whole)}


def dynamics_rows() -> dict:
    """Ranks record uneven shares of 7 examples; the epoch's rows and a checkpoint's partial epoch."""
    a, b = D.shard_bounds(7)
    idx = torch.arange(a, b).flip(0)  # any order within the rank
    dyn = TrainingDynamics()
    dyn.add(idx, torch.stack([idx.float(), -idx.float()], 1), idx % 2)
    saved = dyn.state_dict()
    rows = dyn.epoch_rows(0)
    again = TrainingDynamics()
    again.load_state_dict(saved)  # as after a resume: the partial epoch once, on rank 0
    return {"rows": rows, "saved_n": len(saved["idx"]), "resumed_rows": again.epoch_rows(0)}


def weight_mixup_error() -> str:
    node = OmegaConf.load(CONF / "method" / "weight_mixup.yaml")
    method = instantiate_method(node, "method")
    try:
        method.setup(tiny_model(), ctx())
    except UserError as e:
        return str(e)
    return ""


def scenarios(rank: int = 0) -> dict:
    out = {"rose_first": rose_steps("first"), "rose_ensemble": rose_steps("ensemble"), "child_d": child_d_mask(),
           "child_f": child_f_masks(), "flooding": flooding_grads(), "dynamics": dynamics_rows()}
    if D.world_size() > 1:
        out["weight_mixup"] = weight_mixup_error()
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(scenarios, 2)


@pytest.fixture(scope="module")
def single() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return scenarios()
    finally:
        torch.set_num_threads(threads)


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def close(a, b) -> bool:
    if isinstance(a, dict):
        return all(close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7)
    return a == b if a is None or b is None else math.isclose(a, b, rel_tol=1e-4)


# --- the checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["first", "ensemble"])
def test_rose_masks_identical_across_ranks_and_equal_one_process(ranks, single, variant):
    r0, r1, one = ranks[0][f"rose_{variant}"], ranks[1][f"rose_{variant}"], single[f"rose_{variant}"]
    assert equal(r0["masks"], r1["masks"]) and equal(r0["scores"], r1["scores"]) and equal(r0["kl"], r1["kl"])
    assert equal(r0["weights"], r1["weights"])  # the same updates: the weights stay identical
    assert equal(r0["masks"], one["masks"])  # the global batch's selection...
    assert close(r0["scores"], one["scores"]) and close(r0["kl"], one["kl"])  # ...from its KL gradient
    assert close(r0["weights"], one["weights"])
    masks = torch.stack(r0["masks"])
    assert 0 < masks.sum() < masks.numel()  # some tensors frozen, some updated: the scores mattered


def test_child_tuning_d_mask_equals_one_process(ranks, single):
    r0, r1, one = ranks[0]["child_d"], ranks[1]["child_d"], single["child_d"]
    assert equal(r0["mask"], r1["mask"]) and equal(r0["mask"], one["mask"])
    assert r0["fisher"]["tokens"] == one["fisher"]["tokens"] == 70 and r0["fisher"]["batches"] == 3
    assert r0["fisher"]["flops"] == one["fisher"]["flops"]


def test_child_tuning_f_mask_identical_across_ranks_and_resumes(ranks):
    r0, r1 = ranks[0]["child_f"], ranks[1]["child_f"]
    assert equal(r0["masks"], r1["masks"])  # different global RNG streams, one mask
    assert not equal(r0["masks"][0], r0["masks"][1])  # a fresh mask every step
    assert equal(r0["resumed"], r0["masks"][1])  # seeded by (seed, step): a resume redraws it
    kept = torch.cat([m.reshape(-1) for m in r0["masks"][0]])
    assert set(kept.unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.3))} and abs((kept > 0).float().mean() - 0.3) < 0.05


def test_flooding_takes_the_global_batch_sign(ranks, single):
    first, whole = single["flooding"]["first_vs_whole"]
    assert first != whole
    for r in ranks:
        assert close(r["flooding"]["grads"], single["flooding"]["grads"])
        assert float(r["flooding"]["below"]) == float(single["flooding"]["below"])


def test_dynamics_gather_every_example_once(ranks, single):
    for r in ranks:
        assert r["dynamics"]["rows"] == single["dynamics"]["rows"]
        assert [row["guid"] for row in r["dynamics"]["rows"]] == list(range(7))
        assert r["dynamics"]["resumed_rows"] == single["dynamics"]["rows"]
        assert r["dynamics"]["saved_n"] == 7


def test_weight_mixup_stage1_refuses_data_parallel(ranks):
    for r in ranks:
        assert r["weight_mixup"].startswith("method=weight_mixup's stage 1 (bi-level, method.folds=5) runs in one "
                                            "process only, this run has 2; run it single-process")
