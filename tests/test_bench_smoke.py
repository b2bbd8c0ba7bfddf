"""Smoke test of scripts/bench_train.py: every arm and the eval timing run end to end on a tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DATA_DIR, needs_data

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"


@needs_data()
def test_bench_train_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny_random", "--tasks", "sst2", "--train-examples", "24",
           "--batch-size", "8", "--repeats", "1", "--warmup-steps", "1", "--eval-examples", "16",
           "--threads", "1", "--data-dir", str(DATA_DIR), "--out", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "robustft ÷ arm" in proc.stdout and "bf16 ÷ fp32" in proc.stdout

    res = json.loads(out.read_text())["tasks"]["sst2"]
    assert res["n_train"] == 24 and res["steps"] == 3
    for arm in ("robustft", "hf_dynamic", "hf_maxlen"):
        (run,) = res["runs"][arm]
        assert run["steps"] == 3 and run["examples"] == 24  # same slice, same number of optimizer steps
        assert run["examples_per_s"] > 0 and math.isfinite(run["examples_per_s"])
    assert res["padded_tokens_per_example"]["hf_maxlen"] == 128
    assert res["real_tokens_per_example"]["robustft"] == res["real_tokens_per_example"]["hf_dynamic"]
    assert set(res["ratios"]) == {"hf_dynamic", "hf_maxlen"}
    assert res["eval"]["median"]["fp32"] > 0 and res["eval"]["median"]["bf16"] > 0
