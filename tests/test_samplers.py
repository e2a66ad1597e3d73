"""Samplers chosen per generation (`dgq_core.schedulers`), and a DGQ UNet's step parameters under them and under
image-to-image: every UNet call takes the calibrated parameters of the timestep it runs (`dgq_core.steps`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

import dgq_core
from dgq_core.layers import ActQuantizer
from dgq_core.steps import StepState

CALIBRATED_STEPS = 4
"""The DDIM steps `tiny_dgq_checkpoint_dir` was calibrated on."""


@pytest.fixture(scope="module")
def quantized_tiny(tiny_sd_model_dir, tiny_dgq_checkpoint_dir) -> DiffusionPipeline:
    """The tiny model with its DGQ UNet (fake-quant execution)."""
    return dgq_core.from_pretrained(tiny_sd_model_dir, quantized=tiny_dgq_checkpoint_dir, exec_mode="fake")


def _step_state(unet: torch.nn.Module) -> StepState:
    return next(m.state for m in unet.modules() if isinstance(m, ActQuantizer) and m.state is not None)


def _calls(unet: torch.nn.Module, state: StepState) -> tuple[list[tuple[float, int]], object]:
    """(timestep, calibrated step the quantizers read) of every UNet call, recorded after the step state's hook."""
    calls: list[tuple[float, int]] = []

    def record(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((float(torch.as_tensor(timestep).flatten()[0]), state.step))

    return calls, unet.register_forward_pre_hook(record, with_kwargs=True)


def test_image_to_image_at_half_strength_uses_the_calibrated_parameters_of_the_timesteps_it_runs(quantized_tiny):
    state = _step_state(quantized_tiny.unet)
    calibrated = state.calib_timesteps
    assert len(calibrated) == CALIBRATED_STEPS
    img2img = AutoPipelineForImage2Image.from_pipe(quantized_tiny)
    img2img.set_progress_bar_config(disable=True)
    calls, hook = _calls(quantized_tiny.unet, state)
    try:
        # a text-to-image run first: the image-to-image run must start a new generation, not continue this one
        quantized_tiny("a red square", num_inference_steps=CALIBRATED_STEPS, output_type="latent")
        calls.clear()
        img2img("a red square", image=Image.new("RGB", (16, 16), (200, 30, 30)), strength=0.5,
                num_inference_steps=CALIBRATED_STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    half = CALIBRATED_STEPS // 2
    assert [t for t, _ in calls] == calibrated[half:], "strength 0.5 runs the second half of the schedule"
    assert [step for _, step in calls] == list(range(half, CALIBRATED_STEPS)), (
        "each call takes the parameters calibrated at its timestep, not those of the first calibrated calls"
    )


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "unipc"])
def test_every_sampler_takes_the_nearest_calibrated_timestep_at_every_call(quantized_tiny, sampler):
    state = _step_state(quantized_tiny.unet)
    own = quantized_tiny.scheduler
    quantized_tiny.scheduler = dgq_core.make_scheduler(sampler, own.config)
    calls, hook = _calls(quantized_tiny.unet, state)
    try:
        image = quantized_tiny("a red square", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                               output_type="np").images[0]
    finally:
        hook.remove()
        quantized_tiny.scheduler = own
    assert len(calls) >= 5 and torch.isfinite(torch.from_numpy(image)).all()
    calibrated = state.calib_timesteps
    for timestep, step in calls:
        distances = [abs(c - timestep) for c in calibrated]
        assert distances[step] == min(distances), (sampler, timestep, calibrated[step])
    assert len({step for _, step in calls}) >= 3, "the calls spread over the calibrated steps"


def test_sampler_catalog_per_model(tiny_sd_model_dir):
    ddim = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir).scheduler.config
    assert dgq_core.available_samplers(ddim) == ["ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "unipc"]
    assert dgq_core.sampler_name(ddim) == "ddim"
    dpm = dgq_core.make_scheduler("dpmpp_2m_karras", ddim)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler" and dpm.config.use_karras_sigmas
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.beta_schedule == ddim["beta_schedule"]
    assert dgq_core.sampler_name(dpm.config) == "dpmpp_2m_karras"
    assert dgq_core.make_scheduler("unipc", ddim).config.solver_order == 1, "order 1: BENCHMARKS.md, Samplers"
    with pytest.raises(ValueError, match="'lcm' is not available for this model; choose one of ddim, euler"):
        dgq_core.make_scheduler("lcm", ddim)
    # an LCM-distilled model (its own scheduler an LCMScheduler) also runs LCM
    lcm = dgq_core.make_scheduler("ddim", ddim)
    lcm_config = {**lcm.config, "_class_name": "LCMScheduler"}
    assert dgq_core.available_samplers(lcm_config)[-1] == "lcm"
    assert type(dgq_core.make_scheduler("lcm", lcm_config)).__name__ == "LCMScheduler"
    pndm = {**ddim, "_class_name": "PNDMScheduler"}
    assert dgq_core.sampler_name(pndm) is None and "lcm" not in dgq_core.available_samplers(pndm)
