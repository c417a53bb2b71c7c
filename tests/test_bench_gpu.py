"""bench/gpu.py's CPU path: the GPU figures' code (predict_tile both ways, FLOP counting, the
training core in fp32 and bf16) on tiny inputs, in a subprocess that must never import Ray (the
GPU box it is written for has torch, timm and smp, but no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFERENCE = ("inference_fp32_loop", "inference_default", "inference_memory")
TRAINING = ("train_fp32", "train_bf16", "train_bf16_cl")
TINY_MODELS = ("Unet-resnet18", "Unet-tu-resnet10t", "Unet-tu-efficientnet_b0")

# Runs the script as __main__ and, whatever its exit, reports on stderr whether Ray got imported.
RUNNER = """
import runpy, sys
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
try:
    runpy.run_path("bench/gpu.py", run_name="__main__")
finally:
    sys.stderr.write(f"RAY_IMPORTED={'ray' in sys.modules}\\n")
"""


@pytest.fixture(scope="module")
def tiny_run() -> subprocess.CompletedProcess:
    # explicit peaks, so that the FLOP-bound arithmetic runs on CPU too
    args = ["--device", "cpu", "--tiny", "--peak-tflops", "1", "--peak-tflops-fp32", "0.5"]
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=REPO, capture_output=True, text=True, timeout=240
    )


def test_tiny_cpu_run_exits_0_without_ray(tiny_run):
    assert tiny_run.returncode == 0, tiny_run.stderr[-3000:]
    assert "RAY_IMPORTED=False" in tiny_run.stderr


def test_every_stdout_line_is_one_figure(tiny_run):
    records = [json.loads(line) for line in tiny_run.stdout.splitlines()]
    expected = [(f, m) for m in TINY_MODELS for f in INFERENCE] + [(f, "Unet-resnet18") for f in TRAINING]
    assert [(r["figure"], r["model"]) for r in records] == expected
    for r in records:
        assert r["device"] == "cpu" and r["torch"] and r["unit"] and "error" not in r
        assert "device_name" not in r  # only on CUDA
    by = {(r["figure"], r["model"]): r for r in records}
    for model in TINY_MODELS:
        loop, fast = by[("inference_fp32_loop", model)], by[("inference_default", model)]
        assert loop["value"] > 0 and fast["value"] > 0 and fast["gflops_per_view"] > 0
        assert loop["value"] == pytest.approx(loop["s_per_tile"] / 8, rel=1e-3)
        assert (loop["batched"], fast["batched"], fast["channels_last"]) == (False, True, True)
        assert fast["max_abs_diff_m"] < 1e-3  # fp32 on CPU both ways: the same prediction
        assert loop["peak_tflops"] == fast["peak_tflops"] == 0.5  # predict's "auto" is fp32 on CPU
        assert fast["x_flop_bound"] * fast["mfu"] == pytest.approx(1.0, rel=1e-2)
        assert by[("inference_memory", model)]["value"] is None  # no allocator statistics on CPU
    for figure in TRAINING:
        r = by[(figure, "Unet-resnet18")]
        assert r["value"] > 0 and r["gflops_per_step"] > 0 and r["mfu"] > 0
        assert r["peak_tflops"] == (0.5 if r["precision"] == "fp32" else 1.0)
        assert r["train_loss"] == pytest.approx(by[("train_fp32", "Unet-resnet18")]["train_loss"], rel=0.05)
