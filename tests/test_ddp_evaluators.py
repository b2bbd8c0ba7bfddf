"""Robustness evaluators on a 2-process gloo group: every rank returns exactly the records and metrics a
single-process evaluation of the same model returns, and the ranks split the forward passes."""

from __future__ import annotations

import json

import torch
from transformers import set_seed

from robustft.data import resolve_data_dir
from robustft.methods.base import Method
from robustft.models import load_model, load_tokenizer
from robustft.predict import Predictor
from robustft.robustness.base import EvalContext, build_evaluators, run_evaluators
from tests.conftest import make_cfg, needs_data
from tests.ddp_helpers import run_ranks

pytestmark = needs_data()

TIMING = ("examples_per_s", "queries_per_s")
OVERRIDES = ["model=tiny_random", "task=sst2", "trainer.max_length=32", "trainer.eval_batch_size=16",
             "'robustness=[advglue,typo,textfooler,ood]'", "robustness.typo.num_examples=10",
             "robustness.textfooler.num_examples=10", "robustness.textfooler.concurrency=4",
             "robustness.ood.max_examples=24"]


def same(a, b) -> bool:
    """Equal to the last bit, NaN equal to NaN (json writes floats as their shortest exact repr)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _evaluate(rank: int, overrides: list[str]) -> dict:
    cfg = make_cfg([o.strip("'") for o in overrides])
    set_seed(1)  # the same random tiny model on every rank
    model = load_model(cfg.model, cfg.task).eval()
    predictor = Predictor(model, load_tokenizer(cfg.model), Method("vanilla"), torch.device("cpu"), None,
                          int(cfg.trainer.max_length), int(cfg.trainer.eval_batch_size))
    with torch.no_grad():  # a random tiny model is almost constant: make its decisions depend on the words,
        model.classifier.weight.mul_(200)  # with logits near the boundary (near-ties are what batching could flip)
        model.classifier.bias.sub_(torch.from_numpy(predictor.logits([("a good film",), ("the plot is thin",)]).mean(0)))
    evaluators = build_evaluators(cfg)
    single: dict = {}  # the single-process evaluation: the plain Predictor, in this same process
    ctx = EvalContext(cfg.task, resolve_data_dir(cfg.get("data_dir")), int(cfg.seed))
    start = predictor.queries
    for ev in evaluators:
        metrics, records = ev.evaluate(predictor, ctx)
        single[ev.name] = ({k: v for k, v in metrics.items() if k not in TIMING}, records)
    before = predictor.queries
    metrics, samples = run_evaluators(evaluators, predictor, cfg)
    return {"single": single, "metrics": metrics, "samples": samples, "scored_here": predictor.queries - before,
            "scored_single": before - start}


def test_evaluators_sharded_equal_single_process():
    ranks = run_ranks(_evaluate, 2, OVERRIDES)
    assert same(ranks[0]["metrics"], ranks[1]["metrics"])  # rank 0's metrics everywhere (timing included)
    for out in ranks:
        assert set(out["samples"]) == set(out["single"]) == {"advglue", "typo", "textfooler", "ood"}
        for name, (metrics, records) in ranks[0]["single"].items():
            assert out["samples"][name] == records, name  # every record, in order, bit for bit
            sharded = {k[len(name) + 1:]: v for k, v in out["metrics"].items() if k.startswith(f"{name}/")}
            assert same({k: v for k, v in sharded.items() if k not in TIMING}, metrics), name
    assert same(ranks[0]["single"], ranks[1]["single"])  # the same model on both ranks
    textfooler = ranks[0]["single"]["textfooler"][0]
    assert textfooler["n_succeeded"] > 0 and textfooler["n_failed"] + textfooler["n_skipped"] > 0  # searches ran
    # the ranks shared the forward passes: each scored part of what one process scores alone
    total = ranks[0]["scored_single"]
    assert 0 < ranks[0]["scored_here"] < total and 0 < ranks[1]["scored_here"] < total
    assert ranks[0]["scored_here"] + ranks[1]["scored_here"] == total


def test_sharded_predictor_small_calls():
    """Fewer batches than ranks, one text, none: the plain Predictor's logits, on both ranks."""
    ranks = run_ranks(_small_calls, 2, [0, 1, 5])
    for n, (sharded0, plain0), (sharded1, plain1) in zip([0, 1, 5], *ranks):
        assert sharded0.shape == (n, 2)
        assert (sharded0 == plain0).all() and (sharded1 == plain1).all() and (sharded0 == sharded1).all()


def _small_calls(rank: int, sizes: list[int]) -> list:
    from robustft.robustness.base import ShardedPredictor

    cfg = make_cfg(["model=tiny_random", "task=sst2"])
    set_seed(1)
    predictor = Predictor(load_model(cfg.model, cfg.task).eval(), load_tokenizer(cfg.model), Method("vanilla"),
                          torch.device("cpu"), None, 32, 4)
    out = []
    for n in sizes:
        texts = [(f"a fine {'long ' * i}film",) for i in range(n)]
        out.append((ShardedPredictor(predictor).logits(texts), predictor.logits(texts)))
    return out
