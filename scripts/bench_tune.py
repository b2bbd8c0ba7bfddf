"""A search trial's overhead beyond its training, per launcher (issue #27).

Runs `robustft -m hydra/sweeper=optuna` with N trials of a small training per launcher (basic: the trials in
the sweeper's process; submitit_local: one process each), then reads every trial's start/end from the study
and its records: the trial's wall time (ask -> tell: launch, Hydra config, process, data, model load,
training, evaluation, storage), the run's own wall time (inside the job) and the training loop's
(`train_time_s`). Printed as ratios measured in this run: trial / training loop, and the share of the trial
outside the loop. A second measure times the sweeper and storage alone (a launcher that runs nothing):
seconds per trial for SQLite and the journal file.

    python scripts/bench_tune.py                       # minilm, 1,000 SST-2 examples, 3 trials per launcher
    python scripts/bench_tune.py --model tiny_random --train-examples 64 --trials 2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def search(sweep: Path, launcher: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """One search through the CLI; per trial: trial, run and training-loop seconds."""
    import optuna

    cmd = [sys.executable, "-m", "robustft", "-m", "hydra/sweeper=optuna", f"hydra/launcher={launcher}",
           f"hydra.sweep.dir={sweep}", f"hydra.sweeper.n_trials={args.trials}", f"model={args.model}", "task=sst2",
           f"task.max_train_samples={args.train_examples}", f"task.max_eval_samples={args.eval_examples}",
           "trainer.epochs=1", f"data_dir={args.data_dir}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, cwd=sweep.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_tune: the {launcher} search failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name="robustft/default", storage=f"sqlite:///{sweep / 'optuna.db'}")
    rows = []
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        info = json.loads((sweep / t.user_attrs["rft_dir"] / "run_info.json").read_text())
        rows.append({"trial": (t.datetime_complete - t.datetime_start).total_seconds(),
                     "run": float(info["wall_time_s"]), "train": float(info["train_time_s"])})
    return rows


def sweeper_only(tmp: Path, storage: str, n: int) -> float:
    """Seconds per trial of the sweeper's own work (ask, sample, records, tell) with a launcher that runs nothing."""
    from tests.tune_helpers import fake_launch, run_search

    start = time.perf_counter()
    run_search(tmp, ["method=vanilla"], launch=fake_launch(tmp), n_trials=n, storage=storage)
    return (time.perf_counter() - start) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--launchers", nargs="+", default=["basic", "submitit_local"])
    p.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = p.parse_args()
    print(f"model {args.model}, SST-2 {args.train_examples} train / {args.eval_examples} dev examples, 1 epoch, "
          f"{args.trials} trials per launcher, {args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for launcher in args.launchers:
            rows = search(Path(tmp) / launcher, launcher, args)
            trial, run, train = (statistics.median(r[k] for r in rows) for k in ("trial", "run", "train"))
            print(f"{launcher:>15}: median trial {trial:.1f} s, run {run:.1f} s, training loop {train:.1f} s; "
                  f"trial / training = {trial / train:.2f}x, outside the loop {100 * (1 - train / trial):.0f}% "
                  f"(outside the run: {100 * (1 - run / trial):.0f}%)")
        for name, storage in (("sqlite", None), ("journal", f"journal:{tmp}/j/study.journal")):
            per = sweeper_only(Path(tmp) / f"only_{name}", storage, 20)
            print(f"sweeper + {name} storage alone: {1000 * per:.0f} ms per trial (20 trials, no training)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
