"""Run every method once with a fixed seed and print its metrics.json values: the before/after check of a
refactor that must not change behaviour.

    python scripts/check_equivalence.py --out before.json            # on the old commit
    python scripts/check_equivalence.py --out after.json --compare before.json

Each run goes through the console script (`python -m robustft.cli`), so the check does not depend on
internal APIs. Timing keys (wall time, examples/s) and paths are dropped; everything else must be equal
to the last bit (same machine, same torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["model=tiny_random", "task=sst2", "task.max_train_samples=64", "task.max_eval_samples=32",
        "trainer.epochs=2", "trainer.batch_size=8", "trainer.eval_every=4", "trainer.log_every=2",
        "trainer.precision=fp32", "trainer.max_length=32", "seed=3"]
WM = ["method=weight_mixup", "method.folds=2", "method.stage1.epochs=1", "method.stage1.batch_size=8"]
# minilm slice: the real model, 256 examples, one epoch
MINILM = ["model=minilm", "task=sst2", "task.max_train_samples=256", "task.max_eval_samples=64",
          "trainer.epochs=1", "trainer.batch_size=32", "trainer.eval_every=4", "trainer.log_every=2",
          "trainer.precision=fp32", "trainer.max_length=64", "seed=3"]
CASES: dict[str, list[str]] = {
    "vanilla": TINY,
    "match_tuning": [*TINY, "method=match_tuning"],
    "rose_first": [*TINY, "method=rose", "method.variant=first"],
    "rose_second": [*TINY, "method=rose", "method.variant=second"],
    "rose_ensemble": [*TINY, "method=rose", "method.variant=ensemble"],
    "match_tuning+selector=rose": [*TINY, "method=match_tuning", "selector=rose"],
    "cartography": [*TINY, "method=cartography"],
    "ftft_minilm2": [*TINY, "method=ftft"],
    "ftft_glove": [*TINY, "method=ftft", "method.reference.model=glove_bow",
                   "method.reference.model_overrides.num_layers=null"],
    "weight_mixup": [*TINY, *WM],
    "minilm_vanilla": MINILM,
    "minilm_match_tuning": [*MINILM, "method=match_tuning"],
    "minilm_rose_second": [*MINILM, "method=rose", "method.variant=second"],
}
DROP = ("wall_s", "examples_per_s", "_time", "time_s")


def run_case(overrides: list[str], root: Path) -> dict[str, float]:
    run_dir = root / "run"
    env = {**os.environ, "ROBUSTFT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "robustft.cli", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in sorted(metrics.items()) if not any(d in k for d in DROP)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier --out file: report every value that differs")
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    args = ap.parse_args()
    results = {}
    for name, overrides in CASES.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="equiv_") as tmp:
            results[name] = run_case(overrides, Path(tmp))
        print(f"{name}: {len(results[name])} metrics", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        bad = 0
        for name, metrics in results.items():
            old = before.get(name, {})
            diff = {k: (old.get(k), v) for k, v in metrics.items() if old.get(k) != v}
            missing = sorted(set(old) - set(metrics))
            status = "identical" if not diff and not missing else f"{len(diff)} differ, {len(missing)} missing"
            print(f"{name:28s} {len(metrics):3d} metrics  {status}")
            for k, (a, b) in diff.items():
                print(f"    {k}: {a} -> {b}")
            bad += bool(diff or missing)
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
