"""Preview images while a job denoises: the sampler's current estimate of the finished latents (its x0 prediction,
which is already a recognisable picture after a few steps), decoded cheaply into a small PNG.

Decoders (`Settings.preview_decoder`):

- "vae": the model's own VAE, what the final image goes through; cheap for small models such as the bundled one.
- "taesd": the tiny TAESD decoder (MIT, shipped in `assets/taesd`, ~1 M parameters) for Stable Diffusion 1.x/2.x
  latents, a fraction of the SD VAE's cost.

The final image always comes from the model's VAE (`decode_latents`).
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

PREVIEW_MAX_SIDE = 256
"""Previews are scaled down to at most this many pixels a side (never up)."""
TAESD_DIR = Path(__file__).resolve().parent / "assets" / "taesd"
SMALL_VAE_PARAMETERS = 10_000_000
"""'auto' decodes previews with the model's VAE when its decoder has at most this many parameters (the bundled
model's: 0.6 M; SD's: 50 M)."""
SD_SCALING_FACTOR = 0.18215
"""The latent scaling of Stable Diffusion 1.x/2.x, whose latent space TAESD decodes."""


def load_taesd(device: str | torch.device = "cpu") -> AutoencoderTiny:
    """The shipped TAESD encoder and decoder (madebyollin/taesd's safetensors) as a diffusers `AutoencoderTiny`."""
    model = AutoencoderTiny()
    weights = {f"encoder.layers.{key}": value for key, value in load_file(TAESD_DIR / "taesd_encoder.safetensors").items()}
    for key, value in load_file(TAESD_DIR / "taesd_decoder.safetensors").items():
        index, rest = key.split(".", 1)  # the original decoder counts its layers from 1 (layer 0 is its clamp)
        weights[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    model.load_state_dict(weights, strict=True)
    return model.float().eval().to(device)


@torch.inference_mode()
def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (B, C, h, w) through the model's VAE into PIL images (one call for the batch)."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def choose_decoder(pipe: DiffusionPipeline, wanted: str) -> str:
    """The preview decoder for `pipe`: `wanted`, or for "auto" the VAE when small, TAESD for SD 1.x/2.x latents,
    else the VAE.

    Raises:
        ValueError: "taesd" for latents that are not 4-channel.
    """
    vae = pipe.vae
    if wanted == "taesd" and vae.config.latent_channels != 4:
        raise ValueError(f"preview_decoder 'taesd' decodes 4-channel latents; this model's have "
                         f"{vae.config.latent_channels}: use 'vae'")
    if wanted != "auto":
        return wanted
    if sum(p.numel() for p in vae.decoder.parameters()) <= SMALL_VAE_PARAMETERS:
        return "vae"
    is_sd_latent = vae.config.latent_channels == 4 and abs(vae.config.scaling_factor - SD_SCALING_FACTOR) < 1e-4
    return "taesd" if is_sd_latent else "vae"


class PreviewDecoder:
    """Latents -> small preview PNGs.

    Args:
        pipe (`DiffusionPipeline`): the worker's pipeline (its VAE and image processor).
        decoder (`str`): "auto", "vae" or "taesd" (`choose_decoder`).
    """

    def __init__(self, pipe: DiffusionPipeline, decoder: str = "auto") -> None:
        self.pipe = pipe
        self.decoder = choose_decoder(pipe, decoder)
        self.taesd = load_taesd(pipe.vae.device) if self.decoder == "taesd" else None

    @torch.inference_mode()
    def pngs(self, latents: torch.Tensor) -> list[bytes]:
        """Previews of latents (B, C, h, w) in the UNet's latent space, decoded as one batch (a preview need not
        be bit-exact, unlike the final images, which are decoded one at a time)."""
        if self.taesd is None:
            images = decode_latents(self.pipe, latents)
        else:
            images = self.pipe.image_processor.postprocess(self.taesd.decode(latents.float()).sample, output_type="pil")
        for image in images:
            image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
        return [png_bytes(image) for image in images]


def _estimate(scheduler: object, output: object) -> torch.Tensor | None:
    """The x0 prediction of the step that returned `output`, where the scheduler exposes one."""
    fields = output if isinstance(output, tuple) else tuple(output.values())
    if len(fields) > 1 and fields[1] is not None:
        return fields[1]  # DDIM, Euler, Euler ancestral: pred_original_sample; LCM: denoised
    model_outputs = getattr(scheduler, "model_outputs", None)
    if model_outputs and model_outputs[-1] is not None:
        return model_outputs[-1]  # DPM-Solver++ and UniPC keep their x0 predictions for the multistep update
    return None


@contextlib.contextmanager
def denoised_estimates(scheduler: object) -> Iterator[Callable[[], torch.Tensor | None]]:
    """While it is open, every `scheduler.step` keeps its x0 prediction; yields a getter of the latest one (None
    before the first step, or for schedulers that expose none, such as PNDM).

    Args:
        scheduler (`SchedulerMixin`): the scheduler a pipeline call runs.
    """
    step = scheduler.step
    latest: list[torch.Tensor | None] = [None]

    # wraps: pipelines pass `generator` (and `eta`) only to a step whose signature names them
    @functools.wraps(step)
    def step_keeping_estimate(*args, **kwargs):
        output = step(*args, **kwargs)
        latest[0] = _estimate(scheduler, output)
        return output

    scheduler.step = step_keeping_estimate
    try:
        yield lambda: latest[0]
    finally:
        del scheduler.step  # the class's method again
