"""robustft-report on runs with per-example records: example-level marks, intersection accuracy under
attack, the attack footer, hygiene errors and warnings, kept records, and the forest plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from robustft.report import cli, render
from robustft.report.collect import ReportError, load_runs
from robustft.report.plots import forest, forest_families
from robustft.report.scorecard import build

N = 40  # held-out examples per run


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root: Path, method: str, seed: int, correct: np.ndarray, *, task: str = "sst2",
             attack_ok: np.ndarray | None = None, preds: np.ndarray | None = None, lr: float = 1e-4,
             metrics_text: str | None = None) -> Path:
    """A completed run with selection=carve: test predictions, an attack's samples and AdvGLUE samples."""
    run = root / f"{method}-{task}-{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "task": {"name": task}, "method": {"name": method}, "selector": {"name": "none"},
              "model": {"name": "minilm"}, "trainer": {"lr": lr}, "stress": {"seed": seed}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", f"seed={seed}"]))
    protocol = {"split": "test", "sample": {"n": len(correct), "split_seed": 42, "sha256": "ab12" * 16},
                "query_budget": 300, "constraints": [{"type": "MaxModificationRate", "max_rate": 0.2}],
                "attack_seed": seed}  # as the runner writes run_info.json evaluators.<name>
    info = {"status": "completed", "seed": seed, "task": task, "method": method, "model": "minilm",
            "main_metric": "validation/accuracy", "git_sha": "abc", "selection": "carve",
            "evaluators": {"textfooler": protocol}}
    (run / "run_info.json").write_text(json.dumps(info))
    n = len(correct)
    labels = np.arange(n) % 2
    preds = np.where(correct, labels, 1 - labels) if preds is None else preds
    write(run / "predictions" / "test.jsonl", [{"idx": i, "label": int(labels[i]), "pred": int(preds[i])}
                                               for i in range(n)])
    write(run / "predictions" / "validation.jsonl", [{"idx": i, "label": 0, "pred": 0} for i in range(10)])
    attack_ok = correct if attack_ok is None else attack_ok
    status = ["skipped" if not c else "failed" if a else "succeeded" for c, a in zip(correct, attack_ok)]
    write(run / "eval" / "textfooler" / "samples.jsonl", [{"idx": i, "status": s, "label": "x"} for i, s in
                                                         enumerate(status)])
    write(run / "eval" / "advglue" / "samples.jsonl", [{"idx": i, "subset": "sst2", "correct": bool(c)}
                                                      for i, c in enumerate(correct)])
    metrics = {"validation/accuracy": 1.0, "test/accuracy": float(np.mean(preds == labels)),
               "advglue/overall": float(np.mean(correct)), "textfooler/acc_under_attack": status.count("failed") / n,
               "textfooler/max_queries": 300.0, "textfooler/n_examples": float(n), "cost/total_flops": 1e12,
               "textfooler/max_word_rate": float("nan")}  # nan = no limit: a parameter, not a NaN score
    (run / "metrics.json").write_text(metrics_text if metrics_text is not None else json.dumps(metrics))
    return run


@pytest.fixture
def records_tree(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for seed in (1, 2, 3):
        base = rng.random(N) < 0.6
        make_run(root, "vanilla", seed, base, attack_ok=base & (np.arange(N) % 4 == 0))
        make_run(root, "robust", seed, base | (rng.random(N) < 0.8), attack_ok=np.arange(N) % 2 == 0)
    return root


def test_example_level_marks_and_held_out_clean_column(records_tree: Path) -> None:
    card = build(load_runs(records_tree))
    titles = [c.title for c in card.columns]
    assert "sst2 clean (held-out test)" in titles and not any(c.selected for c in card.columns)
    clean = next(c for c in card.columns if c.kind == "clean")
    assert clean.metric == "test/accuracy"
    comp = card.comparisons["robust"][clean.key]
    assert comp.test == "examples" and comp.n == 3 and comp.n_examples == N and len(comp.mcnemar) == 3
    assert comp.significant and comp.p_holm < 0.05 and comp.mdd > 0
    advglue = card.comparisons["robust"][next(c.key for c in card.columns if c.kind == "advglue")]
    assert advglue.test == "examples"
    assert card.footer == ["textfooler: constraints=MaxModificationRate(max_rate=0.2), max_queries=300, "
                           "n_examples=40, query_budget=300, sample.n=40, sample.sha256=ab12ab12ab12, "
                           "sample.split_seed=42, split=test"]
    assert all(r["nan_metrics"] == [] for r in load_runs(records_tree))  # max_word_rate nan: no warning
    assert not any("no per-example records" in w for w in card.warnings)
    assert not any("attacked different samples" in w for w in card.warnings)  # one sample: no warning


def test_attack_footer_says_how_many_runs_did_not_record_a_parameter(records_tree: Path) -> None:
    """A run that predates run_info `evaluators` (an older sample rule) must not pass for one with the same
    sample: the footer says how many of the attack's runs recorded nothing."""
    info_path = records_tree / "vanilla-sst2-1" / "run_info.json"
    info = json.loads(info_path.read_text())
    del info["evaluators"]
    info_path.write_text(json.dumps(info))
    card = build(load_runs(records_tree))
    (footer,) = card.footer
    assert "sample.sha256=(not recorded by 1 of 6 runs) / ab12ab12ab12" in footer
    assert "max_queries=300," in footer  # in every run's metrics.json: nothing to say
    assert any(w.startswith("textfooler: the runs attacked different samples") for w in card.warnings)


def test_intersection_accuracy_under_attack_hand_computed(tmp_path: Path) -> None:
    # 6 examples: vanilla right on 0-3 (both seeds), robust on 1-5: the intersection is {1, 2, 3}
    root = tmp_path / "runs"
    for seed in (1, 2):
        make_run(root, "vanilla", seed, np.array([1, 1, 1, 1, 0, 0], bool),
                 attack_ok=np.array([1, 1, 0, 0, 0, 0], bool))            # survives 0, 1
        make_run(root, "robust", seed, np.array([0, 1, 1, 1, 1, 1], bool),
                 attack_ok=np.array([0, 1, 1, 1, 1, 1], bool))            # survives 1-5
    card = build(load_runs(root))
    common = next(c for c in card.columns if c.common)
    assert common.title == "sst2 textfooler on common (3)"
    assert card.cell("vanilla", common) == {("sst2", 1): pytest.approx(1 / 3), ("sst2", 2): pytest.approx(1 / 3)}
    assert card.cell("robust", common) == {("sst2", 1): 1.0, ("sst2", 2): 1.0}
    plain = next(c for c in card.columns if c.kind == "attack" and not c.common)
    assert card.cell("vanilla", plain)[("sst2", 1)] == pytest.approx(2 / 6)  # today's number stays beside it
    assert card.comparisons["robust"][common.key].n_examples == 3


def test_differing_configs_under_one_label_are_an_error(records_tree: Path) -> None:
    make_run(records_tree, "vanilla", 4, np.ones(N, bool), lr=2e-5)
    with pytest.raises(ReportError, match=r"vanilla on sst2 differ in resolved config keys trainer.lr.*--label-by"):
        build(load_runs(records_tree))
    card = build(load_runs(records_tree), label_by=["trainer.lr"])  # the hint works: separate rows
    assert "vanilla[trainer.lr=2e-05]" in card.labels


def test_corrupt_and_nan_metrics_are_named(records_tree: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = make_run(records_tree, "vanilla", 7, np.ones(N, bool), metrics_text="{not json")
    nan = make_run(records_tree, "robust", 8, np.ones(N, bool),
                   metrics_text=json.dumps({"test/accuracy": float("nan"), "validation/accuracy": 0.9}))
    gone = make_run(records_tree, "vanilla", 9, np.ones(N, bool))
    (gone / "metrics.json").unlink()
    assert cli.main([str(records_tree), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert f"left out {bad}: its metrics.json is unreadable (JSONDecodeError) (not counted)" in out
    assert f"left out {gone}: its metrics.json is missing (not counted)" in out
    assert f"{nan} has NaN metrics (test/accuracy)" in out
    assert "robust report: 6 runs" not in out and "robustft report: 7 runs" in out  # the corrupt run is not counted


def test_unwritable_out_and_unknown_label_key_fail_before_any_output(records_tree: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main([str(records_tree), "--out", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"robustft-report: error: cannot write to --out {blocker / 'sub'}")
    assert cli.main([str(records_tree), "--out", str(tmp_path / "o"), "--label-by", "trainer.lrr"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--label-by key 'trainer.lrr' is in no run" in captured.err
    long = "k" * 1000
    assert cli.main([str(records_tree), "--out", str(tmp_path / "o"), "--label-by", long]) == 2
    assert len(capsys.readouterr().err) < 400  # user data quoted to at most ~200 characters
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main([str(records_tree), "--out", str(locked)]) == 2


def test_a_collapsed_run_gets_no_robustness_mark(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    labels = np.arange(N) % 2
    for seed in (1, 2, 3):
        good = np.arange(N) % 5 != 0
        make_run(root, "vanilla", seed, good, attack_ok=np.zeros(N, bool))
        make_run(root, "lora", seed, labels == 1, preds=np.ones(N, int), attack_ok=labels == 1)  # one class
    card = build(load_runs(root))
    assert ("lora", "sst2") in card.collapsed and card.majority["sst2"] == 0.5
    attack = next(c for c in card.columns if c.kind == "attack" and not c.common)
    comp = card.comparisons["lora"][attack.key]
    assert comp.diff > 0.4 and comp.p_holm < 0.05 and comp.collapsed and not comp.significant
    clean = next(c for c in card.columns if c.kind == "clean")
    assert card.comparisons["lora"][clean.key].significant  # its clean loss is real and stays marked
    assert any("majority-class rate" in w and "lora seed 1" in w for w in card.warnings)


def test_a_near_constant_run_is_at_the_majority_rate_and_left_out_of_the_intersection(tmp_path: Path) -> None:
    """PGD-K at its defaults predicted both classes and scored 0.505 on SST-2 dev: the score rule holds with
    records too. Left in, the near-constant run would cut the intersection to one class's examples."""
    root = tmp_path / "runs"
    labels = np.arange(N) % 2
    near_constant = np.ones(N, int)
    near_constant[:2] = 0                                   # two 0s: both classes predicted, accuracy 0.5
    for seed in (1, 2):
        make_run(root, "vanilla", seed, np.arange(N) % 4 != 0)        # wrong on 0, 4, 8, ...: 10 of 40
        make_run(root, "robust", seed, np.arange(N) % 8 != 1)         # wrong on 1, 9, 17, ...: 5 of 40
        make_run(root, "pgd", seed, near_constant == labels, preds=near_constant)
    card = build(load_runs(root))
    assert ("pgd", "sst2") in card.collapsed and ("robust", "sst2") not in card.collapsed
    common = next(c for c in card.columns if c.common)
    assert common.title == "sst2 textfooler on common (25)"  # 40 - 10 - 5: pgd's 20 right answers not asked
    assert card.cell("pgd", common) == {} and card.cell("robust", common)
    assert any("pgd seed 1" in w and "left out of its 'on common'" in w for w in card.warnings)
    assert "runs at the majority-class rate left out" in render.legend(card)


def test_keep_records_copies_predictions_and_samples(records_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main([str(records_tree), "--out", str(out), "--keep-records"]) == 0
    kept = out / "runs" / "robust" / "sst2" / "seed1"
    assert (kept / "predictions" / "test.jsonl").is_file() and (kept / "eval" / "textfooler" / "samples.jsonl").is_file()
    again = build(load_runs(out / "runs"))
    first = build(load_runs(records_tree))
    key = next(c.key for c in first.columns if c.kind == "clean")
    assert again.comparisons["robust"][key].p == first.comparisons["robust"][key].p


def test_legend_states_the_mark_and_ddof_everywhere(records_tree: Path, tmp_path: Path) -> None:
    card = build(load_runs(records_tree))
    for text in (render.to_markdown(card, "t"), render.to_latex(card), render.legend(card)):
        assert "Holm-adjusted p < 0.05" in text and "ddof=1" in text
    assert "MDD (80% power)" in render.to_markdown(card, "t")


def test_forest_plot_has_one_panel_per_task(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    rng = np.random.default_rng(3)
    for task in ("sst2", "rte", "mrpc"):
        for seed in (1, 2):
            make_run(root, "vanilla", seed, rng.random(N) < 0.6, task=task)
            make_run(root, "robust", seed, rng.random(N) < 0.7, task=task)
    card = build(load_runs(root))
    families = forest_families(card)
    assert set(families) >= {"clean", "AdvGLUE", "textfooler"}
    fig = forest(card, "clean", families["clean"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["mrpc", "rte", "sst2"]
    assert all(ax.get_yticklabels()[0].get_text() == "robust" for ax in panels)
    assert len(fig.axes) == 3 and fig.get_size_inches()[0] <= 3 * 4.8  # a grid of at most 3 columns
    assert cli.main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report_forest_clean.png").is_file()


def test_regression_records_give_no_majority_rate_or_collapse(tmp_path: Path) -> None:
    from robustft.report.collect import load_records

    write(tmp_path / "predictions" / "validation.jsonl", [{"idx": i, "label": 3.5, "pred": 3.5} for i in range(5)])
    recs = load_records(tmp_path)
    assert "validation#labels" not in recs and "validation#preds" not in recs and len(recs["validation"]) == 5
