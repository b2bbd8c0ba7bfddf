"""The carved dev split depends on task.split_seed only: shared by every run seed, reused by train=false.

A synthetic local SNLI bundle (300 pairs, no dev file) keeps these fast and independent of shared/data.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import robustft.runner
from robustft.cli import CONF_DIR
from robustft.data import load_task
from robustft.errors import UserError
from robustft.provenance import trained_split
from robustft.rundir import RunDir
from robustft.runner import fit
from tests.conftest import make_cfg
from tests.tiny_models import one_thread  # noqa: F401  (module fixture)

N_ROWS, DEV = 300, 40
LABELS = ["entailment", "neutral", "contradiction"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_bundle(root, n_rows: int = N_ROWS) -> None:
    """snli/train_100k.tsv and snli/test.tsv in the shared/data layout; every 50th train row lacks a gold label."""
    (root / "snli").mkdir(parents=True, exist_ok=True)
    words = "the a dog cat man woman runs sleeps eats park house street red big small old".split()
    for name, n in (("train_100k.tsv", n_rows), ("test.tsv", 20)):
        lines = ["pairID\tsentence1\tsentence2\tgold_label"]
        for i in range(n):
            s1 = " ".join(words[(i * k) % len(words)] for k in (1, 3, 5, 7, 2))
            s2 = " ".join(words[(i * k + 4) % len(words)] for k in (2, 5, 3))
            label = "-" if name.startswith("train") and i % 50 == 49 else LABELS[i % 3]
            lines.append(f"p{i}\t{s1} {i}\t{s2}\t{label}")
        (root / "snli" / name).write_text("\n".join(lines) + "\n")


@pytest.fixture
def bundle(tmp_path):
    write_bundle(tmp_path / "data")
    return tmp_path / "data"


def snli(**over):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "task" / "snli.yaml"), {"selection_size": DEV, **over})


def test_dev_split_is_shared_by_run_seeds_and_disjoint_from_their_training_data(bundle):
    task = snli(max_train_samples=50, max_eval_samples=10)
    runs = {seed: load_task(task, str(bundle), seed) for seed in (1, 2, 3)}
    carved = {seed: d.carved for seed, d in runs.items()}
    assert len({tuple(c.ids) for c in carved.values()}) == 1 and carved[1].split_seed == task.split_seed
    assert len(carved[1].ids) == DEV  # the whole carve, before max_eval_samples
    dev = set(carved[1].ids)
    assert len({tuple(d["validation"]["idx"]) for d in runs.values()}) == 1
    assert set(runs[1]["validation"]["idx"]) <= dev and len(runs[1]["validation"]) == 10
    for d in runs.values():
        assert len(d["train"]) == 50 and not dev & set(d["train"]["idx"])
    # the training subsample still follows the run seed
    assert runs[1]["train"]["idx"] != runs[2]["train"]["idx"]
    other = load_task(snli(split_seed=task.split_seed + 1), str(bundle), 1).carved
    assert other.ids != carved[1].ids and other.sha256 != carved[1].sha256


def test_task_with_a_dev_file_carves_nothing(tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        rows = "".join(f"s{i}\t{i % 2}\n" for i in range(6))
        (tmp_path / "glue" / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    task = OmegaConf.load(CONF_DIR / "task" / "sst2.yaml")
    assert load_task(task, str(tmp_path), 0).carved is None


def test_carve_without_split_seed_is_a_user_error(bundle):
    task = snli()
    task.pop("split_seed")
    with pytest.raises(UserError, match="no task.split_seed; add split_seed"):
        load_task(task, str(bundle), 0)


def test_trained_split_reads_the_run_of_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    record = {"task": "snli", "split_seed": 7, "n": 3, "sha256": "ab"}
    (run / "run_info.json").write_text(json.dumps({"task": "snli", "seed": 1, "split_seed": 7, "dev_split": record}))
    assert trained_split(run, "snli") == (7, record)
    assert trained_split(run / "checkpoints" / "best", "snli") == (7, record)
    assert trained_split(run, "mnli") == (None, None)  # another task's run says nothing about this split
    # a run from before task.split_seed carved its dev split with its run seed
    (run / "run_info.json").write_text(json.dumps({"task": "snli", "seed": 5}))
    assert trained_split(run / "checkpoints" / "best", "snli") == (5, None)
    assert trained_split(tmp_path / "bare_checkpoint", "snli") == (None, None)


@pytest.fixture
def spy(monkeypatch):
    """Every split fit() loads: {'train': idx, 'validation': idx} per call, as the runner received them."""
    calls: list[dict[str, list[int]]] = []

    def load(*args, **kwargs):
        data = load_task(*args, **kwargs)
        calls.append({s: list(d["idx"]) for s, d in data.items()})
        return data

    monkeypatch.setattr(robustft.runner, "load_task", load)
    return calls


def tiny(bundle, *extra: str) -> list[str]:
    return [f"data_dir={bundle}", "model=tiny_random", "task=snli", f"task.selection_size={DEV}",
            "task.max_train_samples=64", "task.max_eval_samples=16", "trainer.epochs=1", "trainer.batch_size=16",
            "trainer.eval_every=epoch", "trainer.precision=fp32", "trainer.max_length=32", *extra]


def test_train_false_evaluates_on_the_trained_runs_dev_split(tmp_path, bundle, spy):
    # two run seeds, trained with a non-default split seed: same dev split, none of either's training pairs in it
    for seed in (1, 2):
        fit(make_cfg(tiny(bundle, f"seed={seed}", "task.split_seed=7")), RunDir(tmp_path / f"seed{seed}"))
    (trained1, trained2), dev = spy[:2], set(json.loads((tmp_path / "seed1" / "splits.json").read_text())["validation"]["idx"])
    info = json.loads((tmp_path / "seed1" / "run_info.json").read_text())
    assert info["split_seed"] == 7 and info["dev_split"]["n"] == DEV
    assert json.loads((tmp_path / "seed2" / "run_info.json").read_text())["dev_split"] == info["dev_split"]
    assert trained1["validation"] == trained2["validation"] and set(trained1["validation"]) <= dev
    assert not dev & (set(trained1["train"]) | set(trained2["train"]))
    # the default split seed would have carved training pairs of seed 1 into "dev": the check below has teeth
    assert set(load_task(snli(), str(bundle), 42).carved.ids) & set(trained1["train"])

    # train=false without seed=1 or task.split_seed=7: the run's split seed is reused, attacks included
    ev = make_cfg(tiny(bundle, "train=false", f"ckpt_path={tmp_path / 'seed1'}", "robustness=[typo]",
                       "robustness.typo.num_examples=4", "robustness.typo.log_every=0"))
    fit(ev, RunDir(tmp_path / "eval"))
    evaluated = spy[2]["validation"]
    assert evaluated == trained1["validation"] and not set(evaluated) & set(trained1["train"])
    assert json.loads((tmp_path / "eval" / "run_info.json").read_text())["dev_split"] == info["dev_split"]
    attacked = [json.loads(x)["idx"] for x in (tmp_path / "eval" / "eval" / "typo" / "samples.jsonl").open()]
    # attacks score the held-out split (SNLI's official test), never the selection split
    assert len(attacked) == 4 and set(attacked) <= set(spy[2]["test"])

    # a different carve (here another selection_size; likewise changed data) is refused, in one line
    with pytest.raises(UserError, match=r"^ckpt_path=.*seed1: the selection split carved now \(task.split_seed=7, 30 ") as e:
        fit(make_cfg([*tiny(bundle, "train=false", f"ckpt_path={tmp_path / 'seed1'}"), "task.selection_size=30"]),
            RunDir(tmp_path / "eval_bad"))
    assert "\n" not in str(e.value)
    write_bundle(bundle, N_ROWS - 10)
    with pytest.raises(UserError, match="is not the one that run recorded"):
        fit(make_cfg(tiny(bundle, "train=false", f"ckpt_path={tmp_path / 'seed1' / 'checkpoints' / 'best'}")),
            RunDir(tmp_path / "eval_changed"))
