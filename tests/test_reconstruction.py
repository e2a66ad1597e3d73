"""AdaRound's reconstruction survives an interruption: the resume file restores the finished units and the random
state, so the interrupted-then-resumed run ends with the uninterrupted run's codes, and a file from another
reconstruction is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import build_tiny_sd

from dgq_core import reconstruction
from dgq_core.calibration import collect_unet_stats
from dgq_core.config import DGQConfig

SIZE, STEPS = 16, 3
SETTINGS = dict(groups=1, steps=STEPS, height=SIZE, width=SIZE, w_bits=4, weight_rounding="adaround", recon_samples=8)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    config = DGQConfig(**SETTINGS)
    calibration = collect_unet_stats(pipe, config, ["a red circle", "a blue square"], 2, progress=False, record_inputs=True)
    return pipe.unet, calibration


def _codes(weights: dict) -> dict[str, torch.Tensor]:
    return {name: weight.unpacked_codes() for name, weight in weights.items()}


def test_an_interrupted_reconstruction_resumes_to_the_uninterrupted_result(calibrated, tmp_path, monkeypatch):
    unet, calibration = calibrated
    config = DGQConfig(**SETTINGS, recon_iters=6)
    whole, whole_report = calibration.reconstruct(unet, config, progress=False)

    learn_unit, trained = reconstruction._learn_unit, []

    def interrupted_at_the_third_unit(*args, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append(learn_unit(*args, **kwargs))

    resume_file = tmp_path / "progress.safetensors"
    monkeypatch.setattr(reconstruction, "_learn_unit", interrupted_at_the_third_unit)
    with pytest.raises(KeyboardInterrupt):
        calibration.reconstruct(unet, config, progress=False, resume_file=resume_file)
    monkeypatch.setattr(reconstruction, "_learn_unit", learn_unit)
    assert resume_file.is_file()

    resumed, report = calibration.reconstruct(unet, config, progress=False, resume_file=resume_file)
    assert report.resumed_units == 2 and whole_report.resumed_units == 0
    assert report.loss_learned == whole_report.loss_learned
    whole_codes, resumed_codes = _codes(whole), _codes(resumed)
    assert whole_codes.keys() == resumed_codes.keys()
    for name, codes in whole_codes.items():
        assert torch.equal(resumed_codes[name], codes), name
    # Without the saved generator state the later units would draw other rows and learn other codes.
    assert report.units > 2


def test_a_resume_file_of_another_reconstruction_is_refused(calibrated, tmp_path):
    unet, calibration = calibrated
    resume_file = tmp_path / "progress.safetensors"
    calibration.reconstruct(unet, DGQConfig(**SETTINGS, recon_iters=2), progress=False, resume_file=resume_file)
    _, report = calibration.reconstruct(unet, DGQConfig(**SETTINGS, recon_iters=2), progress=False, resume_file=resume_file)
    assert report.resumed_units == report.units
    with pytest.raises(ValueError, match="another reconstruction .* delete it"):
        calibration.reconstruct(unet, DGQConfig(**SETTINGS, recon_iters=3), progress=False, resume_file=resume_file)


def test_a_resume_file_takes_inputs_a_rounding_apart_but_not_other_inputs(calibrated, tmp_path):
    unet, calibration = calibrated
    config = DGQConfig(**SETTINGS, recon_iters=2)
    resume_file = tmp_path / "progress.safetensors"
    calibration.reconstruct(unet, config, progress=False, resume_file=resume_file)
    inputs = calibration.inputs
    try:
        # A GPU's run-to-run rounding in the calibration generations: still the same reconstruction.
        calibration.inputs = replace(inputs, sample=inputs.sample * (1 + 1e-6))
        _, report = calibration.reconstruct(unet, config, progress=False, resume_file=resume_file)
        assert report.resumed_units == report.units
        # Other latents (another seed) in one call: another reconstruction.
        other = inputs.sample.clone()
        other[1] = torch.randn_like(other[1])
        calibration.inputs = replace(inputs, sample=other)
        with pytest.raises(ValueError, match="another reconstruction"):
            calibration.reconstruct(unet, config, progress=False, resume_file=resume_file)
    finally:
        calibration.inputs = inputs
