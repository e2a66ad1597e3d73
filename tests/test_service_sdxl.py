"""An SDXL-architecture model through the service: the front stage carries the pooled text embedding to the worker.

The tiny SDXL pipeline has the real architecture (two text encoders, the text_time added embedding) at random init,
DGQ-quantized; a request's image must match what the diffusers pipeline itself makes for the same prompt and seed.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from conftest import running_api
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tiny_models import build_tiny_sdxl

import dgq_core
from service.config import Settings

pytestmark = pytest.mark.anyio

REQUEST = {"prompt": "a red square", "steps": 3, "seed": 7, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def sdxl_dgq(tmp_path_factory) -> tuple:
    """(tiny SDXL model dir, its DGQ W8A8 K=4 checkpoint)."""
    model_dir = build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    config = dgq_core.DGQConfig(method="dgq", groups=4, steps=3)
    dgq_core.quantize_(pipe, config, ["a red square", "a blue circle"], batch_size=2, progress=False)
    checkpoint = tmp_path_factory.mktemp("tiny-sdxl-dgq") / "checkpoint"
    dgq_core.save_pretrained(pipe, checkpoint, self_contained=False, base_model=str(model_dir))
    return model_dir, checkpoint


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


async def test_sdxl_request_matches_the_diffusers_pipeline(sdxl_dgq):
    model_dir, checkpoint = sdxl_dgq
    settings = Settings(model=str(model_dir), quantized=str(checkpoint), warmup_steps=1, batch_window_s=0.01)
    async with running_api(settings) as client:
        served = await client.post("/generate", json=REQUEST)
        assert served.status_code == 200, served.text
        other = await client.post("/generate", json=REQUEST | {"prompt": "a blue circle"})
        info = (await client.get("/v1/models")).json()
        # image-to-image and inpainting take SDXL's image pipelines (the pooled embeddings, the size ids)
        photo = io.BytesIO()
        Image.new("RGB", (32, 32), (30, 200, 40)).save(photo, format="PNG")
        mask = io.BytesIO()
        Image.new("L", (32, 32), 255).save(mask, format="PNG")
        for files in ({"init_image": photo.getvalue()}, {"init_image": photo.getvalue(), "mask": mask.getvalue()}):
            edited = await client.post("/generate", data={k: str(v) for k, v in REQUEST.items()}, files=files)
            assert edited.status_code == 200, edited.text
            assert Image.open(io.BytesIO(edited.content)).size == (32, 32)
    served_image = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"))
    assert served_image.shape == (32, 32, 3)
    assert other.content != served.content, "the prompt reaches the UNet"
    assert info["data"], "the SDXL model is listed"

    pipe = dgq_core.from_pretrained(model_dir, quantized=checkpoint)
    direct = pipe(
        REQUEST["prompt"], num_inference_steps=REQUEST["steps"], guidance_scale=REQUEST["guidance_scale"],
        generator=torch.Generator().manual_seed(REQUEST["seed"]), output_type="np",
    ).images[0]
    direct_image = (direct * 255).round().astype(np.uint8)
    # The worker pads small GEMMs for batch invariance, so float rounding may differ from the plain pipeline's.
    assert psnr_db(served_image, direct_image) >= 35.0
