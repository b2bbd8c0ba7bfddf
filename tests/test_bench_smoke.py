"""Smoke test of scripts/bench_train.py: every arm and the eval timing run end to end on a tiny model.

Neither test assumes a CPU feature: the bf16 arms run where the CPU has bf16 and are reported as skipped
where it has not (simulated in the second test by hiding oneDNN's bf16 support).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from robustft.runtime import autocast_dtype
from tests.conftest import DATA_DIR, needs_data

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"
TINY = ["--model", "tiny_random", "--tasks", "sst2", "--train-examples", "24", "--batch-size", "8", "--repeats", "1",
        "--warmup-steps", "1", "--eval-examples", "16", "--threads", "1", "--data-dir", str(DATA_DIR)]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
NO_BF16 = "bf16 not supported on this CPU"


@needs_data()
def test_bench_train_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "robustft ÷ arm" in proc.stdout and "bf16 ÷ fp32" in proc.stdout

    res = json.loads(out.read_text())["tasks"]["sst2"]
    assert res["n_train"] == 24 and res["steps"] == 3 and res["skipped"] == {}
    for arm in ("robustft", "hf_dynamic", "hf_maxlen"):
        (run,) = res["runs"][arm]
        assert run["steps"] == 3 and run["examples"] == 24  # same slice, same number of optimizer steps
        assert run["examples_per_s"] > 0 and math.isfinite(run["examples_per_s"])
    assert res["padded_tokens_per_example"]["hf_maxlen"] == 128
    assert res["real_tokens_per_example"]["robustft"] == res["real_tokens_per_example"]["hf_dynamic"]
    assert set(res["ratios"]) == {"hf_dynamic", "hf_maxlen"}
    assert res["eval"]["median"]["fp32"] > 0
    if autocast_dtype(torch.device("cpu"), "bf16") is not None:  # this CPU has bf16 (AVX512-BF16 / AMX)
        assert res["eval"]["median"]["bf16"] > 0 and res["eval"]["skipped"] == {}
    else:
        assert res["eval"]["skipped"] == {"bf16": NO_BF16} and f"skipped: {NO_BF16}" in proc.stdout


@needs_data()
def test_bench_skips_arms_the_cpu_cannot_run(tmp_path):
    """On a CPU without bf16 (simulated), a bf16 bench skips every bf16 arm and says so instead of raising."""
    out = tmp_path / "bench.json"
    argv = [str(SCRIPT), *TINY, "--arms", "robustft", "--precision", "bf16", "--out", str(out)]
    code = ("import runpy, sys, torch; torch.ops.mkldnn._is_mkldnn_bf16_supported = lambda: False; "
            f"sys.argv = {argv!r}; sys.path.insert(0, {str(SCRIPT.parent)!r}); runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]

    res = json.loads(out.read_text())["tasks"]["sst2"]
    assert res["runs"] == {} and res["skipped"] == {"robustft": NO_BF16}  # training arms run in bf16: skipped
    assert res["eval"]["skipped"] == {"bf16": NO_BF16} and set(res["eval"]["median"]) == {"fp32"}
    assert res["eval"]["median"]["fp32"] > 0
    assert "bf16_over_fp32" not in res["eval"]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("│") and f"skipped: {NO_BF16}" in ln]
    assert len(rows) == 2, proc.stdout  # one row in the training table, one in the evaluation table
