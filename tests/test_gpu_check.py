"""The rehearsal of bench/gpu_check.py, the one prepared script for a lent GPU: a device session has 15 minutes, so
the script must not fail there for a reason the CPU could have shown.

On CPU with --tiny every part runs with small models (integers on oneDNN, the attention kernel in Triton's
interpreter, the CUDA tests deselected); what it writes is checked for every figure the GPU run will report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNET_VARIANTS = {"fp16", "dgq-fake-w8a8", "dgq-fake-w4a8", "dgq-int-w8a8", "dgq-int-w8a8-eager", "dgq-int-w4a8"}


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "bench/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = results["parts"]
    assert {name: part["status"] for name, part in parts.items()} == {
        name: "ok" for name in
        ("cuda-tests", "unet-sd15", "service-bundled", "attention", "quantize-sd15", "service-sd15", "unet-sdxl",
         "adaround-sd15")
    }  # fmt: skip
    assert "deselected" in parts["cuda-tests"]["result"]["summary"], "no GPU here: the CUDA tests are counted"
    assert (tmp_path / "pytest.txt").is_file()

    for name in ("unet-sd15", "unet-sdxl"):
        rows = parts[name]["result"]["rows"]
        assert {row["variant"] for row in rows} == UNET_VARIANTS
        for row in rows:
            assert row["s_per_call"] > 0 and 0 < row["weight_bytes_vs_fp16"] <= 2
            if row["variant"].startswith("dgq-int"):
                assert row["psnr_db_vs_fake"] >= 40, row
    assert results["cuda_auto_min_weights"] == parts["unet-sd15"]["result"]["cuda_auto_min_weights"]
    assert len(parts["unet-sd15"]["result"]["layer_sweep"]) > 10
    assert set(parts["unet-sd15"]["result"]["profiles"]) == {"fp16", "dgq-int-w8a8-eager"}

    assert {row["variant"] for row in parts["attention"]["result"]["rows"]} >= {"fused tf32x3", "sdpa fp16 (unquantized)"}
    assert max(r["max_error_vs_reference"] for r in parts["attention"]["result"]["rows"] if "fused" in r["variant"]) < 1e-5
    quantize = parts["quantize-sd15"]["result"]
    assert quantize["calibration_s"] > 0 and "--num-calib 4 --steps 4" in quantize["command"]
    adaround = parts["adaround-sd15"]["result"]
    assert adaround["units"] > 10 and adaround["steps_per_unit"] == 5 and adaround["rows"] >= 32
    assert "W4A8" in adaround["report"] and "adaround weights" in adaround["report"]
    assert 0 < adaround["training_s"] < adaround["reconstruction_s"] and adaround["ms_per_step"] > 0
    for name in ("service-bundled", "service-sd15"):
        served = parts[name]["result"]
        assert served["batch4_mean_images_per_batch"] == 4.0 and served["latency_s"]["service"] > 0
        assert "dgq_cuda_memory_allocated_bytes" in served["memory_metrics"]

    summary = (tmp_path / "gpu_check.md").read_text()
    assert "## Bars" in summary and "CUDA_AUTO_MIN_WEIGHTS" in summary and "rehearsal" in summary
