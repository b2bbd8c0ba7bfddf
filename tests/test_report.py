"""robustft-report: statistics against hand-computed cases, and the scorecard of a synthetic tree of runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from robustft.report import cli, render, stats
from robustft.report.collect import load_runs
from robustft.report.scorecard import build

# ------------------------------------------------------------------------------------------- statistics


def test_paired_t_test_hand_computed() -> None:
    # diffs 0.02, 0.04, 0.03, 0.05: mean 0.035, sd sqrt(0.0005/3) = 0.012910, t = 0.035 / (0.012910 / 2) = 5.4222
    method = {("rte", s): v for s, v in zip(range(4), [0.72, 0.74, 0.73, 0.75])}
    base = {("rte", s): v for s, v in zip(range(4), [0.70, 0.70, 0.70, 0.70])}
    diffs = stats.paired_diffs(method, base)
    assert diffs == pytest.approx([0.02, 0.04, 0.03, 0.05])
    t = 0.035 / (math.sqrt(0.0005 / 3) / 2)
    assert t == pytest.approx(5.4222, abs=1e-4)
    assert stats.t_test(diffs) == pytest.approx(2 * sps.t.sf(t, df=3), rel=1e-9)
    assert stats.t_test(diffs) == pytest.approx(0.01229, abs=1e-4)


def test_pairs_only_shared_seeds() -> None:
    method = {("rte", 1): 0.8, ("rte", 2): 0.9, ("rte", 3): 0.5}
    base = {("rte", 2): 0.7, ("rte", 3): 0.6, ("rte", 4): 0.1}
    assert stats.paired_diffs(method, base) == pytest.approx([0.2, -0.1])
    assert stats.compare(method, base).n == 2


def test_bootstrap_interval_fixed_numbers() -> None:
    diffs = np.array([0.01, 0.03, 0.02, 0.05, 0.04, 0.03, 0.02, 0.04])
    low, high = stats.bootstrap_ci(diffs)
    assert (low, high) == stats.bootstrap_ci(diffs)  # fixed random_state: reproducible
    # The percentile interval of the mean sits inside the data range, around the mean (0.030), and close to
    # the t interval mean ± t_.975(7) s / sqrt(8) = 0.030 ± 2.3646 x 0.013093 / 2.8284 = [0.0191, 0.0409]
    # (a bootstrap interval is a bit narrower at small n).
    assert 0.01 < low < 0.030 < high < 0.05
    assert low == pytest.approx(0.0191, abs=0.003) and high == pytest.approx(0.0409, abs=0.003)
    assert stats.bootstrap_ci(np.array([0.02, 0.02, 0.02])) == (0.02, 0.02)
    assert all(math.isnan(x) for x in stats.bootstrap_ci(np.array([0.5])))


def test_wilcoxon_only_from_six_pairs() -> None:
    assert math.isnan(stats.wilcoxon(np.array([0.1, 0.2, 0.3, 0.4, 0.5])))
    # all six differences positive: exact two-sided p = 2 / 2^6 = 0.03125
    assert stats.wilcoxon(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])) == pytest.approx(0.03125)


def test_holm_known_list() -> None:
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = stats.holm([0.01, math.nan, 0.02])  # nan is not a test: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_drop_one_seed_flag() -> None:
    # a steady gain survives dropping any seed
    steady = np.array([0.02, 0.03, 0.025, 0.035, 0.03, 0.02])
    assert stats.bootstrap_ci(steady)[0] > 0 and not stats.drop_one_fragile(steady)
    # 4 pairs, one slightly negative: the full CI excludes 0 (a resample of four -0.001 has probability
    # 1/256 < 2.5%; any other resample has a positive mean). Drop a positive seed and 3 pairs remain: the
    # all-negative resample has probability 1/27 > 2.5%, so the lower end is -0.001 and the CI covers 0.
    carried = np.array([0.05, 0.04, 0.03, -0.001])
    assert stats.bootstrap_ci(carried)[0] > 0
    assert stats.bootstrap_ci(np.array([0.04, 0.03, -0.001]))[0] == pytest.approx(-0.001)
    assert stats.drop_one_fragile(carried)
    # 2 pairs: dropping one leaves a single pair, whose CI is undefined -> flagged
    assert stats.drop_one_fragile(np.array([0.03, 0.031]))
    # no gain: nothing to flag
    assert not stats.drop_one_fragile(np.array([0.01, -0.02, 0.0, 0.015]))


# ----------------------------------------------------------------------------------------- synthetic tree

# (method, selector) -> per-seed clean accuracy on rte; AdvGLUE = clean - 0.3 (+ 0.05 for robust methods)
CLEAN = {
    ("vanilla", "none"): [0.70, 0.72, 0.71, 0.69, 0.70],
    ("match_tuning", "rose"): [0.72, 0.74, 0.73, 0.71, 0.725],
    ("rose", "none"): [0.71, 0.71, 0.71, 0.70],
}


def write_run(path: Path, *, task: str, method: str, selector: str, seed: int, metrics: dict[str, float] | None,
              status: str = "completed", sha: str = "abc123") -> None:
    """One run folder as robustft writes it (.hydra/config.yaml, run_info.json, metrics.json)."""
    (path / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "task": {"name": task}, "method": {"name": method}, "selector": {"name": selector},
              "model": {"name": "minilm"}, "trainer": {"lr": 1e-4}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"method={method}", f"selector={selector}", f"seed={seed}"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    info = {"status": status, "seed": seed, "task": task, "method": method, "model": "minilm",
            "main_metric": "validation/accuracy", "git_sha": sha}
    (path / "run_info.json").write_text(json.dumps(info))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))


def run_metrics(method: str, selector: str, clean: float, seed: int) -> dict[str, float]:
    robust = clean - 0.3 + (0.05 if method != "vanilla" else 0.0) + 0.001 * seed
    return {"validation/accuracy": clean, "validation/loss": 0.5, "advglue/overall": robust, "advglue/accuracy": robust,
            "textfooler/acc_under_attack": clean / 2, "textfooler/n": 100.0, "ood/anli_r1_accuracy": 0.34,
            "cost/total_flops": 1e12 * (2.0 if method == "match_tuning" else 1.0), "cost/train_flops": 1e12}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    for (method, selector), accs in CLEAN.items():
        for seed, acc in enumerate(accs, start=1):
            write_run(root / f"method={method},selector={selector}" / f"seed={seed}", task="rte", method=method,
                      selector=selector, seed=seed, metrics=run_metrics(method, selector, acc, seed),
                      sha="def456" if (method, seed) == ("rose", 4) else "abc123")
    write_run(root / "method=vanilla,selector=none" / "seed=9", task="rte", method="vanilla", selector="none",
              seed=9, metrics=None, status="failed")
    return root


def test_scorecard_values_and_comparisons(tree: Path) -> None:
    card = build(load_runs(tree))
    assert card.labels == ["vanilla", "match_tuning+rose", "rose"]  # the baseline first
    titles = [c.title for c in card.columns]
    assert titles == ["rte clean", "rte AdvGLUE", "rte textfooler", "rte OOD anli_r1", "rte cost"]
    clean = card.columns[0]
    assert sorted(card.cell("rose", clean).values()) == sorted(CLEAN[("rose", "none")])

    mt = card.comparisons["match_tuning+rose"][clean.key]
    diffs = np.subtract(CLEAN[("match_tuning", "rose")], CLEAN[("vanilla", "none")])
    assert mt.n == 5 and mt.diff == pytest.approx(diffs.mean())
    assert mt.p_t == pytest.approx(sps.ttest_rel(CLEAN[("match_tuning", "rose")], CLEAN[("vanilla", "none")]).pvalue)
    assert mt.significant and math.isnan(mt.p_wilcoxon)  # n = 5 < 6
    rose = card.comparisons["rose"][clean.key]
    assert rose.n == 4 and rose.diff == pytest.approx(0.0025) and not rose.significant
    # Holm over the two methods of the column
    assert [mt.p_holm, rose.p_holm] == pytest.approx(stats.holm([mt.p_t, rose.p_t]))
    assert card.relative_cost["match_tuning+rose"]["rte"] == pytest.approx(2.0)
    assert card.relative_cost["vanilla"]["rte"] == pytest.approx(1.0)
    warnings = " ".join(card.warnings)
    assert "unequal seed sets" in warnings and "rose: 1,2,3,4" in warnings
    assert "fewer than 5 seeds: rose rte (n=4)" in warnings


def test_report_cli_writes_files(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert cli.main([str(tree), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "match_tuning+rose" in printed and "left out 1 run(s) not completed (1 failed)" in printed
    assert "2 code versions" in printed

    md = (out / "report.md").read_text()
    mean, std = np.mean(CLEAN[("vanilla", "none")]), np.std(CLEAN[("vanilla", "none")], ddof=1)
    assert f"| vanilla | {mean:.3f} ± {std:.3f} (5) |" in md
    mt_mean = np.mean(CLEAN[("match_tuning", "rose")])
    mt_std = np.std(CLEAN[("match_tuning", "rose")], ddof=1)
    assert f"| match_tuning+rose | {mt_mean:.3f} ± {mt_std:.3f} (5)*" in md  # CI excludes 0
    assert "| 2.00x |" in md and "## Paired differences vs vanilla" in md and "## Warnings" in md

    with open(out / "report.csv", newline="") as f:
        rows = {(r["method"], r["column"]): r for r in csv.DictReader(f)}
    row = rows[("match_tuning+rose", "rte clean")]
    assert float(row["mean"]) == pytest.approx(mt_mean) and row["n"] == "5" and row["ci_excludes_0"] == "True"
    assert row["seeds"] == "1 2 3 4 5"
    assert float(rows[("match_tuning+rose", "rte cost")]["relative_cost"]) == pytest.approx(2.0)

    tex = (out / "report.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"match\_tuning+rose" in tex and r"$\pm$" in tex and r"$^{*}$" in tex
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_plot_shows_clean_and_every_robust_score(tree: Path) -> None:
    from robustft.report.render import plotted_columns

    card = build(load_runs(tree))
    assert [c.title for c in plotted_columns(card, "rte")] == ["rte clean", "rte AdvGLUE", "rte textfooler",
                                                               "rte OOD anli_r1"]


def test_report_cli_two_tasks_pools_advglue(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for task, shift in (("rte", 0.0), ("sst2", 0.2)):
        for method in ("vanilla", "rose"):
            for seed in (1, 2, 3):
                write_run(root / task / method / str(seed), task=task, method=method, selector="none", seed=seed,
                          metrics=run_metrics(method, "none", 0.7 + shift + 0.01 * seed, seed))
    card = build(load_runs(root))
    pooled = next(c for c in card.columns if c.title == "AdvGLUE overall")
    # per seed the mean of the two tasks' official scores
    expected = {("all", s): np.mean([0.7 + sh + 0.01 * s - 0.3 + 0.001 * s for sh in (0.0, 0.2)]) for s in (1, 2, 3)}
    assert card.cell("vanilla", pooled) == pytest.approx(expected)
    assert card.comparisons["rose"][pooled.key].diff == pytest.approx(0.05)


def test_report_cli_errors(tmp_path: Path, tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustft-report: error:") and "not a folder" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert cli.main([str(tree), "--baseline", "bitfit", "--out", str(tmp_path / "o")]) == 2
    assert "--baseline bitfit is not a row" in capsys.readouterr().err
    failed = tmp_path / "failed"
    write_run(failed / "a", task="rte", method="vanilla", selector="none", seed=1, metrics=None, status="failed")
    assert cli.main([str(failed)]) == 2
    assert "none of the 1 runs is completed" in capsys.readouterr().err


def test_report_without_baseline_warns(tree: Path, tmp_path: Path) -> None:
    runs = [r for r in load_runs(tree) if r["config"]["method"]["name"] != "vanilla"]
    card = build(runs)
    assert not card.comparisons and any("no vanilla runs" in w for w in card.warnings)
    card = build(runs, baseline="rose", baseline_required=True)
    assert set(card.comparisons) == {"match_tuning+rose"}


def test_rows_are_named_by_tag(tmp_path: Path) -> None:
    """Arms of an experiment recipe share a method (rose) and tag their runs: the tag names the row."""
    root = tmp_path / "runs"
    for tag, method in (("vanilla", "vanilla"), ("rose_first", "rose"), ("rose_second", "rose")):
        for seed in (1, 2):
            write_run(root / tag / str(seed), task="rte", method=method, selector="none", seed=seed,
                      metrics=run_metrics(method, "none", 0.7 + 0.01 * seed, seed))
            cfg_path = root / tag / str(seed) / ".hydra" / "config.yaml"
            cfg_path.write_text(yaml.safe_dump({**yaml.safe_load(cfg_path.read_text()), "tag": tag}))
    card = build(load_runs(root))
    warns = [w for w in card.warnings if "no per-example records" not in w]  # these runs have none
    assert len(warns) == len(card.warnings) - 1  # ... and the report says their marks are seed-level
    assert card.labels == ["vanilla", "rose_first", "rose_second"] and not warns[1:]
    assert set(card.comparisons) == {"rose_first", "rose_second"}


def test_console_script_is_declared() -> None:
    import importlib

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["robustft-report"]
    module, _, func = target.partition(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_label_by_pairs_each_row_with_the_baseline_of_its_group(tmp_path: Path) -> None:
    """--label-by stress.low_resource.n: weight_mixup at N is compared with vanilla at the same N."""
    root = tmp_path / "runs"
    for n, shift in ((300, 0.0), (1000, 0.1)):
        for method, gain in (("vanilla", 0.0), ("weight_mixup", 0.02)):
            for seed in (1, 2, 3):
                path = root / f"{method}-{n}" / str(seed)
                write_run(path, task="rte", method=method, selector="none", seed=seed,
                          metrics=run_metrics(method, "none", 0.6 + shift + gain + 0.001 * seed * seed, seed))
                cfg_path = path / ".hydra" / "config.yaml"
                cfg_path.write_text(yaml.safe_dump({**yaml.safe_load(cfg_path.read_text()),
                                                    "stress": {"name": "low_resource", "low_resource": {"n": n}}}))
    card = build(load_runs(root), label_by=["stress.low_resource.n"])
    key = "[stress.low_resource.n={}]"
    assert card.labels == [f"vanilla{key.format(300)}", f"weight_mixup{key.format(300)}",
                           f"vanilla{key.format(1000)}", f"weight_mixup{key.format(1000)}"]
    clean = card.columns[0]
    for n in (300, 1000):
        comp = card.comparisons[f"weight_mixup{key.format(n)}"][clean.key]
        assert comp.n == 3 and comp.diff == pytest.approx(0.02)  # not 0.02 +- 0.1 across groups
    assert card.relative_cost[f"weight_mixup{key.format(1000)}"]["rte"] == pytest.approx(1.0)


def test_kept_records_rebuild_the_same_report(tree: Path, tmp_path: Path) -> None:
    """--keep-records copies the four files the report reads; OUT/runs alone rebuilds report.md exactly,
    and passing OUT/runs again with the original runs copies nothing twice."""
    out = tmp_path / "rep"
    assert cli.main([str(tree), "--out", str(out), "--keep-records"]) == 0
    kept = sorted(p.relative_to(out / "runs") for p in (out / "runs").rglob("run_info.json"))
    assert len(kept) == len([p for p in tree.rglob("run_info.json")]) - 1  # the failed run is not kept
    assert all(len(p.parts) == 4 and p.parts[2].startswith("seed") for p in kept)  # label/task/seed/file
    assert not list((out / "runs").rglob("*.safetensors"))
    again = tmp_path / "again"
    assert cli.main([str(out / "runs"), "--out", str(again)]) == 0
    first, second = (out / "report.md").read_text(), (again / "report.md").read_text()
    drop = ("left out", "code versions")  # the failed run is not among the kept records
    assert [ln for ln in first.splitlines() if not any(d in ln for d in drop)] == \
        [ln for ln in second.splitlines() if not any(d in ln for d in drop)]
    both = tmp_path / "both"  # the kept copies and the originals together: each run counted once
    assert cli.main([str(out / "runs"), str(tree), "--out", str(both), "--keep-records"]) == 0
    assert (both / "report.md").read_text() == first


def test_a_label_key_only_some_runs_have_pairs_with_the_plain_baseline(tmp_path: Path) -> None:
    """--label-by selector.variant: child_tuning[selector.variant=d] is compared with plain vanilla, and
    rows without the key carry no `[selector.variant=<missing>]`."""
    root = tmp_path / "runs"
    for method, selector, gain in (("vanilla", "none", 0.0), ("r3f", "none", 0.01), ("vanilla", "child_tuning", 0.03)):
        for seed in (1, 2, 3):
            path = root / f"{method}-{selector}" / str(seed)
            write_run(path, task="sst2", method=method, selector=selector, seed=seed,
                      metrics=run_metrics(method, selector, 0.8 + gain + 0.001 * seed * seed, seed))
            if selector != "none":
                cfg_path = path / ".hydra" / "config.yaml"
                cfg = yaml.safe_load(cfg_path.read_text())
                cfg["selector"]["variant"] = "d"
                cfg_path.write_text(yaml.safe_dump(cfg))
    card = build(load_runs(root), label_by=["selector.variant"])
    assert set(card.labels) == {"vanilla", "r3f", "vanilla+child_tuning[selector.variant=d]"}
    assert card.baseline_of == {"r3f": "vanilla", "vanilla+child_tuning[selector.variant=d]": "vanilla"}
    clean = card.columns[0]
    assert card.comparisons["vanilla+child_tuning[selector.variant=d]"][clean.key].diff == pytest.approx(0.03)


def test_columns_scored_on_the_selection_split_are_flagged(tree: Path) -> None:
    from robustft.report import render

    card = build(load_runs(tree))
    flags = {c.kind: c.selected for c in card.columns if c.kind != "cost"}
    assert flags == {"clean": True, "advglue": False, "attack": True, "ood": False}  # dev picked the checkpoint
    md = render.to_markdown(card, "t")
    assert "| rte clean‡ |" in md and "selected on this set" in md and "$^\\ddagger$" in render.to_latex(card)


def test_main_table_states_each_rows_tuning_budget(tree: Path, tmp_path: Path) -> None:
    """A tuned protocol's final runs carry tuned_from (run_info); the main table gets a `tuning budget` column
    naming each row's trials, and `untuned` for a row at its YAML defaults (issue #27)."""
    for info_path in tree.glob("method=match_tuning*/seed=*/run_info.json"):
        info = json.loads(info_path.read_text())
        info["tuned_from"] = {"study": "robustft/arm=m", "trial": 3, "value": 0.8, "n_trials": 12}
        info_path.write_text(json.dumps(info))
    card = build(load_runs(tree))
    assert card.budget == {"match_tuning+rose": "12 trials", "vanilla": "untuned", "rose": "untuned"}
    header, rows = render.grid(card)
    assert header[:2] == ["method", "tuning budget"] and len({len(r) for r in [header, *rows]}) == 1
    assert [r[1] for r in rows] == ["untuned", "12 trials", "untuned", ""]  # the MDD row has none
    assert "Tuning budget = " in render.legend(card)
    render.write_csv(card, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        assert {r["method"]: r["tuning_budget"] for r in csv.DictReader(f)}["match_tuning+rose"] == "12 trials"
    assert build(load_runs(tree / "method=vanilla,selector=none")).budget == {}  # no tuned row: no column


def test_seed_warning_lists_seeds_in_numeric_order() -> None:
    """The unequal-seed-sets warning reads 1,2,...,10, not the string order 1,10,2."""
    from robustft.report.scorecard import _seed_key

    assert sorted([10, "2", 1, 3, "x"], key=_seed_key) == [1, "2", 3, 10, "x"]
