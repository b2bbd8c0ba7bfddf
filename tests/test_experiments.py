"""Experiment recipes (conf/experiment/*.yaml): each composes, its sweep grid (hydra.sweeper.params) parses
and every configuration of the grid composes and validates; each *_minilm recipe trains two steps."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from robustft.config import CONF_DIR, group_options
from robustft.rundir import RunDir
from robustft.runner import fit
from robustft.validate import validate
from tests.conftest import make_cfg, needs_data

PAPERS = ["match_tuning_ijcai22", "rose_emnlp22", "weight_mixup_naacl24", "ftft_coling25"]
RECIPES = [*PAPERS, *(f"{p}_minilm" for p in PAPERS), "baselines_sst2_minilm", "defences_sst2_minilm"]
# (runs in the grid, the model) of each recipe
GRIDS = {
    "rose_emnlp22": (4 * 4 * 5, "roberta_base"), "rose_emnlp22_minilm": (4 * 1 * 5, "minilm"),
    "match_tuning_ijcai22": (4 * 3 * 5, "bert_large_cased"), "match_tuning_ijcai22_minilm": (4 * 1 * 5, "minilm"),
    "weight_mixup_naacl24": (8 * 3 * 3 * 5, "bert_large_cased"), "weight_mixup_naacl24_minilm": (8 * 3 * 1 * 5, "minilm"),
    "ftft_coling25": (4 * 4, "deberta_v3_large"), "ftft_coling25_minilm": (4 * 5, "minilm"),
    "baselines_sst2_minilm": (9 * 10, "minilm"), "defences_sst2_minilm": (11 * 5, "minilm"),
}


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes of the recipe's hydra.sweeper.params."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return batch


def test_every_recipe_is_listed() -> None:
    assert set(RECIPES) <= set(group_options("experiment"))


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_composes_and_its_grid_parses(experiment: str) -> None:
    cfg = make_cfg([f"experiment={experiment}"])
    n_runs, model = GRIDS[experiment]
    assert cfg.model.name == model
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert "Budget" in text or not experiment.endswith("_minilm")  # each minilm recipe states its budget
    assert "Baselines" in text  # each recipe says which baselines it runs (conf/arm/) and which it lacks
    jobs = sweep_jobs(experiment)
    assert len(jobs) == n_runs
    seeds = {o for job in jobs for o in job if o.startswith("seed=")}
    assert len(seeds) >= 3
    # every configuration of the grid (seed aside) composes and passes the start-up checks
    configs = {tuple(o for o in job if not o.startswith("seed=")) for job in jobs}
    rows = set()
    for job in sorted(configs):
        cfg = make_cfg([f"experiment={experiment}", *job])
        validate(cfg)
        assert cfg.model.name == model and cfg.robustness
        rows.add(cfg.tag or cfg.method.name)
    assert "vanilla" in rows and len(rows) >= 2  # the baseline row of robustft-report


def test_rose_arms_take_the_readme_thresholds() -> None:
    cfg = make_cfg(["experiment=rose_emnlp22", "arm=rose_emnlp22_second", "task=sst2"])
    assert (cfg.method.name, cfg.method.variant, cfg.method.upper, cfg.trainer.lr) == ("rose", "second", 30.0, 1e-4)
    cfg = make_cfg(["experiment=rose_emnlp22", "arm=rose_emnlp22_first", "task=rte"])
    assert (cfg.method.upper, cfg.trainer.lr, cfg.trainer.epochs, cfg.tag) == (80.0, 4e-5, 10, "rose_first")
    cfg = make_cfg(["experiment=rose_emnlp22_minilm", "arm=rose_emnlp22_ensemble", "task=rte"])
    assert (cfg.model.name, cfg.method.upper, cfg.trainer.lr) == ("minilm", 80.0, 1e-4)


def test_hub_models_fail_in_one_line_offline(tmp_path, monkeypatch) -> None:
    from robustft.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(["experiment=weight_mixup_naacl24", "arm=weight_mixup_naacl24_vanilla", "trainer.max_steps=1",
                    "task.max_train_samples=16"])
    with pytest.raises(UserError) as err:
        fit(cfg, RunDir(tmp_path / "run"))
    assert "\n" not in str(err.value) and "bert-large-cased" in str(err.value)


# arm (the paper's method) of each minilm recipe, and the options that keep a two-step run small
TWO_STEPS = {
    "rose_emnlp22_minilm": ["arm=rose_emnlp22_first", "task=rte"],
    "match_tuning_ijcai22_minilm": ["method=match_tuning", "task=rte", "robustness.textfooler.num_examples=4"],
    "weight_mixup_naacl24_minilm": ["arm=weight_mixup_naacl24", "task=rte", "stress.low_resource.n=32",
                                    "method.folds=2", "method.stage1.epochs=1"],
    "ftft_coling25_minilm": ["arm=ftft_coling25_minilm_l2", "robustness.ood.max_examples=16",
                             "method.reference.model=tiny_random", "method.reference.model_overrides={}"],
    "defences_sst2_minilm": ["arm=dne_5points", *(f"robustness.{a}.num_examples=4" for a in ("textfooler", "pwws", "typo"))],
}


@needs_data()
@pytest.mark.parametrize("experiment", sorted(TWO_STEPS))
def test_minilm_recipe_trains_two_steps(experiment: str, tmp_path) -> None:
    cache = [f"method.reference.cache_dir={tmp_path / 'cache'}"] if experiment.startswith("ftft") else []
    cfg = make_cfg([f"experiment={experiment}", *TWO_STEPS[experiment], *cache, "seed=1", "model=tiny_random",
                    "trainer.max_steps=2", "task.max_train_samples=64", "task.max_eval_samples=32",
                    "trainer.precision=fp32", "trainer.save_checkpoints=false", "trainer.max_length=32"])
    metrics = fit(cfg, RunDir(tmp_path / "run"))
    assert metrics["train/steps"] == 2
    assert 0.0 <= metrics["validation/accuracy"] <= 1.0
    robust = [k for k in metrics if k.startswith(("advglue/", "ood/", "textfooler/"))]
    assert robust and all(not math.isnan(metrics[k]) for k in robust if k.endswith("accuracy"))


def test_preflight_accepts_an_arm_on_the_command_line(tmp_path, monkeypatch) -> None:
    """`arm=...` passes the CLI pre-flight; an unknown arm fails there in one line; `+key=` stays `+key=`."""
    from robustft import cli

    monkeypatch.chdir(tmp_path)
    cli.preflight(["experiment=rose_emnlp22_minilm", "arm=rose_emnlp22_first", "task=rte"], multirun=False)
    cli.preflight(["+trainer.interrupt_at_step=5"], multirun=False)
    with pytest.raises(SystemExit):
        cli.preflight(["experiment=rose_emnlp22_minilm", "arm=rose_nope"], multirun=False)
