"""Local GLUE loading: official row counts, label maps, sentence pairs, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from robustft.cli import CONF_DIR
from robustft.data import epoch_batches, length_grouped_order, load_task, read_glue_tsv
from robustft.errors import UserError
from tests.conftest import DATA_DIR, needs_data


def task_cfg(name: str, **over):
    cfg = OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")
    return OmegaConf.merge(cfg, over)


# (task, split, rows, label counts by id) from shared/data/MANIFEST.md (= the official GLUE numbers)
COUNTS = [
    ("sst2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "validation", 872, {1: 444, 0: 428}),
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "validation", 1043, {1: 721, 0: 322}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
    ("mrpc", "validation", 408, {1: 279, 0: 129}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),
    ("rte", "validation", 277, {0: 146, 1: 131}),
    ("wnli", "train", 635, {0: 323, 1: 312}),
    ("wnli", "validation", 71, {0: 40, 1: 31}),
    ("qnli", "validation", 5463, {1: 2761, 0: 2702}),
    ("mnli", "validation", 9815, {0: 3479, 2: 3213, 1: 3123}),
    ("snli", "test", 9824, {0: 3368, 1: 3219, 2: 3237}),
]


@needs_data()
@pytest.mark.parametrize("task,split,rows,labels", COUNTS)
def test_local_glue_counts_and_labels(task, split, rows, labels):
    ds = load_task(task_cfg(task), str(DATA_DIR), seed=0, need_train=False)
    assert len(ds[split]) == rows
    got = dict(zip(*np.unique(ds[split]["label"], return_counts=True), strict=False))
    assert {int(k): int(v) for k, v in got.items()} == labels
    cfg = task_cfg(task)
    assert set(ds[split].column_names) == {"idx", "label", *cfg.text_fields}


@needs_data()
def test_stsb_is_regression_with_pairs():
    ds = load_task(task_cfg("stsb"), str(DATA_DIR), seed=0)
    assert (len(ds["train"]), len(ds["validation"])) == (5749, 1500)
    assert isinstance(ds["train"][0]["label"], float)
    assert abs(np.mean(ds["train"]["label"]) - 2.70) < 0.01
    assert ds["train"][0]["sentence1"] and ds["train"][0]["sentence2"]


@needs_data()
def test_mrpc_bom_header_and_quotes():
    ds = load_task(task_cfg("mrpc"), str(DATA_DIR), seed=0)
    first = ds["train"][0]
    assert first["sentence1"].startswith("Amrozi accused his brother")
    assert '" the witness "' in first["sentence1"]  # bare quotes survive QUOTE_NONE


@needs_data()
def test_snli_dev_split_follows_split_seed_not_run_seed():
    a = load_task(task_cfg("snli"), str(DATA_DIR), seed=1)
    b = load_task(task_cfg("snli"), str(DATA_DIR), seed=2)
    c = load_task(task_cfg("snli", split_seed=1), str(DATA_DIR), seed=1)
    assert len(a["validation"]) == 9842 and len(a["train"]) == 99890 - 9842
    assert a["validation"]["idx"] == b["validation"]["idx"]
    assert a["validation"]["idx"] != c["validation"]["idx"]
    assert a.carved.ids == sorted(a["validation"]["idx"]) and a.carved.split_seed == 42
    assert not set(a["validation"]["idx"]) & set(a["train"]["idx"])


@needs_data()
def test_max_samples_caps():
    ds = load_task(task_cfg("sst2", max_train_samples=100, max_eval_samples=10), str(DATA_DIR), seed=0)
    assert (len(ds["train"]), len(ds["validation"])) == (100, 10)


@needs_data()
def test_missing_train_file_is_a_user_error():
    with pytest.raises(UserError, match="no training file"):
        load_task(task_cfg("mnli"), str(DATA_DIR), seed=0, need_train=True)


def test_missing_data_dir_and_file(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_task(task_cfg("rte"), str(tmp_path / "nope"), seed=0)
    with pytest.raises(UserError, match="missing data file"):
        load_task(task_cfg("rte"), str(tmp_path), seed=0)


def _write(tmp_path, text):
    path = tmp_path / "f.tsv"
    path.write_text(text)
    return path


def test_malformed_row_names_file_and_line(tmp_path):
    path = _write(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tentailment\n")
    spec = {"header": True, "columns": {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}}
    with pytest.raises(UserError, match=r"f.tsv:3: malformed row, expected 4"):
        read_glue_tsv(path, spec, task_cfg("rte"))


def test_label_outside_label_set(tmp_path):
    path = _write(tmp_path, "sentence\tlabel\ngood\t1\nbad\t7\n")
    spec = {"header": True, "columns": {"sentence": "sentence", "label": "label"}}
    with pytest.raises(UserError, match=r"f.tsv:3: label '7' is not in task sst2's label set"):
        read_glue_tsv(path, spec, task_cfg("sst2"))


def test_empty_split_is_a_user_error(tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "glue" / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(UserError, match="empty"):
        load_task(task_cfg("sst2"), str(tmp_path), seed=0)


def test_length_grouping_is_a_seeded_permutation():
    lengths = list(np.random.default_rng(0).integers(1, 100, size=1000))
    a = length_grouped_order(lengths, 8, np.random.default_rng(3))
    b = length_grouped_order(lengths, 8, np.random.default_rng(3))
    assert a == b and sorted(a) == list(range(1000))
    # batches are far less ragged than a random order
    pad = lambda order: sum(max(lengths[i] for i in order[s:s + 8]) * 8 for s in range(0, 1000, 8))  # noqa: E731
    assert pad(a) < 0.7 * pad(list(np.random.default_rng(3).permutation(1000)))


def test_epoch_batches_differ_by_epoch_and_cover_all():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[1] * (i % 7 + 1) for i in range(50)]})
    e0 = epoch_batches(ds, 8, seed=1, epoch=0, group_by_length=True)
    e1 = epoch_batches(ds, 8, seed=1, epoch=1, group_by_length=True)
    assert e0 != e1
    assert sorted(i for b in e0 for i in b) == list(range(50))
    assert e0 == epoch_batches(ds, 8, seed=1, epoch=0, group_by_length=True)
