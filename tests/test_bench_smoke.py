"""Smoke tests of scripts/bench_train.py (every arm and the eval timing run end to end on a tiny model;
--device picks one device for every arm) and scripts/bench_ddp.py (slow: both arms of the textfooler bench).

No test assumes a CPU feature: the bf16 arms run where the CPU has bf16 and are reported as skipped
where it has not (simulated in the second test by hiding oneDNN's bf16 support). No test needs a GPU:
--device's GPU pinning is checked against a simulated CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustft.runtime import autocast_dtype
from tests.conftest import DATA_DIR, needs_data

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"
BENCH_DDP = SCRIPT.parent / "bench_ddp.py"
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
    env = json.loads(out.read_text())["environment"]
    assert (env["requested_device"], env["device"], env["gpu"]) == ("auto", "cpu", None)  # no GPU visible: CPU
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


def test_bench_device_unavailable_is_one_line_error(tmp_path):
    """--device cuda where no GPU is visible: one error line naming the option, exit status 1, nothing run."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda:0", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench_train.py: error: --device cuda:0: ") and "use --device cpu" in line
    assert not (tmp_path / "bench.json").exists()


def _bench_train_module(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its `from _bench_env import ...`
    spec = importlib.util.spec_from_file_location("bench_train_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("visible", "spec", "pinned"), [
    (None, "cuda", "0"), (None, "cuda:1", "1"), ("4,5", "cuda:1", "5"), ("4,5", "auto", "4"), ("4,5", "cpu", ""),
])
def test_bench_device_pins_one_gpu(monkeypatch, visible, spec, pinned):
    """On CUDA exactly the chosen GPU stays visible (Trainer would otherwise DataParallel over all of them)."""
    bench = _bench_train_module(monkeypatch)
    gpus = {"0", "1", "4", "5"}  # a simulated 4-GPU machine: CUDA sees the pinned one
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: os.environ["CUDA_VISIBLE_DEVICES"] in gpus)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(os.environ["CUDA_VISIBLE_DEVICES"] in gpus))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert bench.select_device(spec) == ("cpu" if spec == "cpu" else "cuda")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == pinned


@pytest.mark.parametrize(("visible", "spec", "why"), [
    ("4,5", "cuda:2", "CUDA_VISIBLE_DEVICES=4,5 leaves 2 GPU(s) visible"), (None, "cuda:7", "finds no GPU 7"),
])
def test_bench_device_missing_gpu(monkeypatch, visible, spec, why):
    bench = _bench_train_module(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: os.environ["CUDA_VISIBLE_DEVICES"] in {"4", "5"})
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(SystemExit, match=f"--device {spec}: .*{re.escape(why)}"):
        bench.select_device(spec)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # auto on the same machine falls back to the CPU instead
    assert bench.select_device("auto") == "cpu"


@pytest.mark.slow
@needs_data()
def test_bench_ddp_textfooler_tiny(tmp_path):
    """Both arms of the textfooler bench (torchrun 2 ranks, 1 process) attack the same checkpoint alike."""
    out = tmp_path / "bench_ddp.json"
    argv = ["--benches", "textfooler", "--model", "tiny_random", "--attack-examples", "6", "--ckpt-train-examples",
            "32", "--max-length", "32", "--repeats", "1", "--data-dir", str(DATA_DIR), "--out", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH_DDP), *argv], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical, DDP == single process" in proc.stdout and "ratio ddp_2x1 / single_1x2" in proc.stdout

    res = json.loads(out.read_text())
    assert "train" not in res and res["textfooler"]["identical"] is True
    for arm in ("ddp_2x1", "single_1x2"):
        (run,) = res["textfooler"]["runs"][arm]
        assert run["metrics"]["n"] == 6 and run["examples_per_s"] > 0 and run["queries_per_s"] > 0


def test_bench_checksums_tiny():
    """scripts/bench_checksums.py end to end on the tiny model: a folder size and both ratios printed."""
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_checksums.py"), "--model", "tiny_random",
                           "--repeats", "1"], capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"checkpoints/last holds [\d.]+ MiB", proc.stdout), proc.stdout
    assert len(re.findall(r"median [\d.]+ s, [\d.]+x the write", proc.stdout)) == 2, proc.stdout
