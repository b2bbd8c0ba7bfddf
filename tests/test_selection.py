"""task.selection=carve: a selection split carved out of train (task.split_seed) selects, the official dev is the
held-out `test` split; per-example records of every scored split (predictions/<split>.jsonl).

A synthetic local SST-2 bundle (200 training sentences, 30 dev sentences, each text unique) keeps these fast.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import robustft.runner
from robustft.cli import CONF_DIR
from robustft.data import load_split, load_task
from robustft.errors import UserError
from robustft.robustness.attack.evaluator import sample_rows
from robustft.rundir import RunDir
from robustft.runner import fit
from robustft.splits import ids_sha256
from tests.conftest import make_cfg
from tests.tiny_models import one_thread  # noqa: F401  (module fixture)

N_TRAIN, N_DEV, SEL = 200, 30, 40
WORDS = "good bad fine awful great dull fun poor nice sad warm cold".split()

pytestmark = pytest.mark.usefixtures("one_thread")


def write_sst2(root) -> None:
    """glue/SST-2/train.tsv and dev.tsv; every sentence names its file and row, so overlaps show in the text."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", N_TRAIN), ("dev.tsv", N_DEV)):
        rows = ["sentence\tlabel"] + [f"{' '.join(WORDS[(i * k) % 12] for k in (1, 5, 7))} {name[:-4]} {i}\t{i % 2}"
                                      for i in range(n)]
        (folder / name).write_text("\n".join(rows) + "\n")


@pytest.fixture
def bundle(tmp_path):
    write_sst2(tmp_path / "data")
    return tmp_path / "data"


def sst2(**over):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "task" / "sst2.yaml"),
                           {"selection": "carve", "selection_size": SEL, **over})


def texts(ds) -> list[str]:
    return list(ds["sentence"])


def test_selection_split_is_shared_by_seeds_disjoint_from_training_and_the_official_dev_is_test(bundle):
    runs = {seed: load_task(sst2(max_train_samples=100), str(bundle), seed) for seed in (1, 2, 3, 4, 5)}
    selection = {seed: texts(d["validation"]) for seed, d in runs.items()}
    assert len({tuple(s) for s in selection.values()}) == 1 and len(selection[1]) == SEL
    dev = [ln.split("\t")[0] for ln in (bundle / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
    for seed, d in runs.items():
        assert list(d) == ["train", "validation", "test"]
        assert len(d["train"]) == 100 and not set(texts(d["train"])) & set(selection[seed])
        assert texts(d["test"]) == dev  # the official dev, whole and in file order
        assert not set(dev) & (set(texts(d["train"])) | set(selection[seed]))
        assert d.carved.ids == sorted(d["validation"]["idx"]) and d.carved.split_seed == 42
    assert len({tuple(d["train"]["idx"]) for d in runs.values()}) == 5  # the run seed still draws the training subset
    # the carve follows task.split_seed (never the run seed); a fraction is a share of train
    assert texts(load_task(sst2(split_seed=7), str(bundle), 1)["validation"]) != selection[1]
    assert len(load_task(sst2(selection_size=0.1), str(bundle), 1)["validation"]) == N_TRAIN // 10


def test_a_carve_that_leaves_no_training_data_and_selection_dev_without_a_dev_file_are_one_line_errors(bundle):
    with pytest.raises(UserError, match=r"^task.selection_size=500 leaves no training data \(200 .*; use a smaller"):
        load_task(sst2(selection_size=500), str(bundle), 1)
    (bundle / "glue" / "SST-2" / "dev.tsv").unlink()
    task = sst2(selection="dev")
    task.local.pop("validation")
    with pytest.raises(UserError, match=r"^task sst2 has no official dev set in the local bundle; use task.selection=carve"):
        load_task(task, str(bundle), 1)


def test_selection_dev_keeps_the_official_dev_as_validation(bundle):
    data = load_task(sst2(selection="dev"), str(bundle), 1)
    assert set(data) == {"train", "validation"} and data.carved is None
    assert len(data["validation"]) == N_DEV and len(data["train"]) == N_TRAIN


def test_load_split_reads_the_held_out_split_alone(bundle):
    """What attacks load: the official dev file only, the same examples load_task names `test`."""
    task = sst2(max_eval_samples=12)
    assert load_split(task, bundle, 3, "test").to_dict() == load_task(task, str(bundle), 3)["test"].to_dict()
    assert load_split(task, bundle, 3, "validation")["idx"] == load_task(task, str(bundle), 3)["validation"]["idx"]


def tiny(bundle, *extra: str) -> list[str]:
    return [f"data_dir={bundle}", "model=tiny_random", "task=sst2", "task.selection=carve",
            f"task.selection_size={SEL}", "task.max_train_samples=64", "trainer.epochs=1", "trainer.batch_size=16",
            "trainer.eval_every=epoch", "trainer.precision=fp32", "trainer.max_length=32", *extra]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_records_the_splits_and_every_scored_examples_prediction(tmp_path, bundle):
    run = tmp_path / "run"
    metrics = fit(make_cfg(tiny(bundle, "seed=3")), RunDir(run))
    info = json.loads((run / "run_info.json").read_text())
    data = load_task(sst2(max_train_samples=64), str(bundle), 3)
    assert info["selection"] == "carve" and info["main_metric"] == "validation/accuracy"
    assert info["main_metric_role"] == "selection" and info["held_out_metric"] == "test/accuracy"
    for split, role in (("train", "train"), ("validation", "selection"), ("test", "held-out")):
        record = info["splits"][split]
        assert record["role"] == role and record["n"] == len(data[split])
        assert record["sha256"] == ids_sha256(list(data[split]["idx"]))
    assert info["splits"]["test"]["source"] == "official dev"
    assert info["dev_split"]["sha256"] == info["splits"]["validation"]["sha256"]  # the carve, for train=false
    for split in ("validation", "test"):
        rows = read_jsonl(run / "predictions" / f"{split}.jsonl")
        gold = dict(zip(data[split]["idx"], data[split]["label"]))
        assert sorted(r["idx"] for r in rows) == sorted(gold)  # every example once
        assert all(r["label"] == gold[r["idx"]] and r["pred"] in (0, 1) and isinstance(r["pred"], int) for r in rows)
        accuracy = sum(r["label"] == r["pred"] for r in rows) / len(rows)
        assert accuracy == pytest.approx(metrics[f"{split}/accuracy"])


def test_train_false_reuses_the_trained_runs_selection(tmp_path, bundle, monkeypatch):
    """A carve run evaluated without task.selection=carve (sst2's default is dev) is scored on the same splits."""
    fit(make_cfg(tiny(bundle, "seed=2")), RunDir(tmp_path / "trained"))
    seen: list[dict] = []

    def spy(*args, **kwargs):
        data = load_task(*args, **kwargs)
        seen.append({s: list(d["idx"]) for s, d in data.items()})
        return data

    monkeypatch.setattr(robustft.runner, "load_task", spy)
    plain = [a for a in tiny(bundle) if not a.startswith("task.selection=")]
    fit(make_cfg([*plain, "train=false", f"ckpt_path={tmp_path / 'trained'}"]), RunDir(tmp_path / "eval"))
    trained = json.loads((tmp_path / "trained" / "run_info.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "run_info.json").read_text())
    assert evaluated["selection"] == "carve" and evaluated["dev_split"] == trained["dev_split"]
    assert evaluated["splits"]["validation"] == trained["splits"]["validation"]
    assert evaluated["splits"]["test"] == trained["splits"]["test"]
    assert (tmp_path / "eval" / "predictions" / "test.jsonl").is_file()


def test_attacks_score_a_fixed_sample_of_the_held_out_split_and_record_their_protocol(tmp_path, bundle):
    attack = ["robustness=[typo]", "robustness.typo.num_examples=8", "robustness.typo.log_every=0",
              "robustness.typo.goal.query_budget=50"]
    for seed in (1, 2):
        fit(make_cfg(tiny(bundle, f"seed={seed}", "task.max_train_samples=32", *attack)), RunDir(tmp_path / f"s{seed}"))
    infos = [json.loads((tmp_path / f"s{s}" / "run_info.json").read_text()) for s in (1, 2)]
    attacked = [[r["idx"] for r in read_jsonl(tmp_path / f"s{s}" / "eval" / "typo" / "samples.jsonl")] for s in (1, 2)]
    assert attacked[0] == attacked[1] and len(attacked[0]) == 8  # the same examples whatever the run seed
    assert attacked[0] != list(range(8)) and set(attacked[0]) <= set(range(N_DEV))  # a sample, of the official dev
    record = infos[0]["evaluators"]["typo"]
    assert record == {**infos[1]["evaluators"]["typo"], "attack_seed": 1}
    assert record["split"] == "test" and record["split_size"] == N_DEV and record["selection"] == "carve"
    assert record["sample"]["n"] == 8 and record["sample"]["split_seed"] == 42
    assert record["sample"]["sha256"] == ids_sha256(attacked[0]) and record["query_budget"] == 50
    assert [c["type"] for c in record["constraints"]] == ["RepeatModification", "StopwordModification",
                                                          "MaxModificationRate"]
    assert record["constraints"][2]["max_rate"] == 0.3 and record["search"]["wir_method"] == "unk"
    metrics = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert (metrics["typo/n_examples"], metrics["typo/max_queries"], metrics["typo/max_word_rate"]) == (8, 50, 0.3)
    # the sample follows task.split_seed (nested: a larger sample holds a smaller one)
    assert sample_rows(N_DEV, 8, 42) == attacked[0] and sample_rows(N_DEV, 8, 5) != attacked[0]
    assert set(sample_rows(N_DEV, 8, 42)) <= set(sample_rows(N_DEV, 20, 42)) and sample_rows(8, 20, 1) == list(range(8))
    # selection=dev attacks the official dev, there named `validation`: the same sample
    dev = [*tiny(bundle, "seed=1", "task.max_train_samples=32", *attack), "task.selection=dev"]
    fit(make_cfg(dev), RunDir(tmp_path / "dev"))
    assert json.loads((tmp_path / "dev" / "run_info.json").read_text())["evaluators"]["typo"]["split"] == "validation"
    assert [r["idx"] for r in read_jsonl(tmp_path / "dev" / "eval" / "typo" / "samples.jsonl")] == attacked[0]


def test_train_false_adopts_the_selection_only_of_a_run_of_the_same_task(tmp_path):
    """A run of another task says nothing about this task's splits: evaluating an SST-2 run (selection=dev)
    on SNLI must not force SNLI onto a dev set the local bundle lacks (the label check then names the mismatch)."""
    from robustft.provenance import trained_selection

    (tmp_path / "run_info.json").write_text(json.dumps({"task": "sst2", "selection": "dev"}))
    assert trained_selection(str(tmp_path), "sst2") == "dev"
    assert trained_selection(str(tmp_path / "checkpoints" / "best"), "sst2") == "dev"
    assert trained_selection(str(tmp_path), "snli") is None
