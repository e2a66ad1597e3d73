"""The `dgq` command end to end on tiny SD and SDXL architectures: quantize, then generate a PNG from the result."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from local_cluster import console_script
from PIL import Image
from tiny_models import build_tiny_sd, build_tiny_sdxl

from dgq_core.checkpoint import WEIGHTS_NAME, read_quant_config
from dgq_core.pipeline import RECON_RESUME_FILE

PROMPTS = "a red circle\nblue square on green\nsmall yellow triangle\n"


def dgq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("dgq"), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_sdxl], ids=["sd", "sdxl"])
def test_quantize_then_generate(builder, tmp_path):
    model = builder(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "quantized"
    # The whole method: AdaRound's reconstruction (a few steps) and statistics from the quantized UNet.
    result = dgq("quantize", "--model", str(model), "--out", str(out), "--w-bits", "4", "--a-bits", "8", "--groups", "4",
                 "--steps", "3", "--calib-prompts", str(prompts), "--num-calib", "2", "--weight-rounding", "adaround",
                 "--recon-iters", "3", "--recon-samples", "6", "--calib-source", "quantized")
    assert result.returncode == 0, result.stderr
    assert "calibration" in result.stdout and "peak RSS" in result.stdout
    assert re.search(r"AdaRound \d+ units x 3 steps on 6 rows", result.stdout), result.stdout
    assert (out / "unet" / WEIGHTS_NAME).is_file() and (out / "model_index.json").is_file()
    assert not (out / RECON_RESUME_FILE).exists(), "the finished reconstruction's resume file stays behind"
    settings = read_quant_config(out / "unet")
    assert (settings.weight_rounding, settings.recon_iters, settings.calib_source) == ("adaround", 3, "quantized")
    image_path = tmp_path / "image.png"
    result = dgq("generate", "--model", str(out), "--prompt", "a red circle", "--seed", "1", "--out", str(image_path))
    assert result.returncode == 0, result.stderr
    kernels = re.search(r"exec auto: \d+/\d+ layers in integers \(([a-z_,]+)\)", result.stdout)
    assert kernels and set(kernels[1].split(",")) <= {"none", "onednn", "vnni", "cpu_attention"}, result.stdout
    with Image.open(image_path) as image:
        assert image.size == (32, 32)


def test_an_interrupted_adaround_quantize_goes_on_from_its_finished_units(tmp_path):
    model = build_tiny_sd(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "quantized"
    command = [console_script("dgq"), "quantize", "--model", str(model), "--out", str(out), "--w-bits", "4",
               "--groups", "2", "--steps", "2", "--calib-prompts", str(prompts), "--num-calib", "2",
               "--weight-rounding", "adaround", "--recon-iters", "20", "--recon-samples", "4"]  # fmt: skip
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the
    # child gets the default disposition back, so the test does not depend on how its runner was started.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (out / RECON_RESUME_FILE).is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"interrupted; AdaRound's finished units are kept in {out / RECON_RESUME_FILE}" in stderr
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert re.search(r"[1-9]\d* units resumed from an interrupted run", result.stdout), result.stdout
    assert not (out / RECON_RESUME_FILE).exists() and (out / "unet" / WEIGHTS_NAME).is_file()


def test_help_and_bad_arguments():
    assert dgq("quantize", "--help").returncode == 0
    bad_bits = dgq("quantize", "--model", "x", "--out", "y", "--w-bits", "3")
    assert bad_bits.returncode != 0 and "--w-bits" in bad_bits.stderr
    ablation = dgq("quantize", "--model", "x", "--out", "y", "--method", "pertensor", "--no-start-split")
    assert ablation.returncode == 1 and "settings of method 'dgq'" in ablation.stderr
    missing = dgq("generate", "--model", "/nonexistent/model", "--prompt", "x")
    assert missing.returncode == 1 and "neither a local directory nor a hub id" in missing.stderr


def test_default_calibration_prompts_are_the_models_own_else_the_coco_calibration_rows(tmp_path):
    from dgq_core.calibration import (
        COCO_CALIBRATION_START,
        COCO_CAPTIONS,
        default_calibration_prompts,
        load_prompt_file,
    )

    (tmp_path / "calibration_prompts.txt").write_text("one\ntwo\nthree\n")
    assert sorted(default_calibration_prompts(tmp_path, 2, seed=0)) in (["one", "three"], ["one", "two"], ["three", "two"])
    coco = default_calibration_prompts(tmp_path / "no-prompts-here", 64, seed=0)
    captions = load_prompt_file(COCO_CAPTIONS)
    assert len(coco) == 64 and set(coco) <= set(captions[COCO_CALIBRATION_START:])
    assert coco == default_calibration_prompts("owner/hub-model", 64, seed=0), "seeded"
