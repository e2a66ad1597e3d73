"""The `dgq` command end to end on tiny SD and SDXL architectures: quantize, then generate a PNG from the result."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image
from tiny_models import build_tiny_sd, build_tiny_sdxl

PROMPTS = "a red circle\nblue square on green\nsmall yellow triangle\n"


def dgq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgq_core.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_sdxl], ids=["sd", "sdxl"])
def test_quantize_then_generate(builder, tmp_path):
    model = builder(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "quantized"
    result = dgq("quantize", "--model", str(model), "--out", str(out), "--w-bits", "4", "--a-bits", "8", "--groups", "4",
                 "--steps", "3", "--calib-prompts", str(prompts), "--num-calib", "2")
    assert result.returncode == 0, result.stderr
    assert "calibration" in result.stdout and "peak RSS" in result.stdout
    assert (out / "unet" / "dgq_unet.safetensors").is_file() and (out / "model_index.json").is_file()
    image_path = tmp_path / "image.png"
    result = dgq("generate", "--model", str(out), "--prompt", "a red circle", "--seed", "1", "--out", str(image_path))
    assert result.returncode == 0, result.stderr
    assert re.search(r"exec auto: \d+/\d+ layers in integers \((none|onednn)\)", result.stdout), result.stdout
    with Image.open(image_path) as image:
        assert image.size == (32, 32)


def test_help_and_bad_arguments():
    assert dgq("quantize", "--help").returncode == 0
    bad_bits = dgq("quantize", "--model", "x", "--out", "y", "--w-bits", "3")
    assert bad_bits.returncode != 0 and "--w-bits" in bad_bits.stderr
    missing = dgq("generate", "--model", "/nonexistent/model", "--prompt", "x")
    assert missing.returncode == 1 and "neither a local directory nor a hub id" in missing.stderr


def test_quantize_without_prompts_says_what_to_pass(tmp_path, monkeypatch):
    from dgq_core import cli

    monkeypatch.setattr(cli, "DEV_COCO", tmp_path / "absent.csv")
    monkeypatch.delenv(cli.COCO_ENV, raising=False)
    args = cli.build_parser().parse_args(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="--calib-prompts"):
        cli.calibration_prompts(args)
