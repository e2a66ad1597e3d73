"""Image-to-image, inpainting, live previews and samplers through the HTTP API: the official `openai` client's
`images.edit` and streaming `images.generate`, the checks an uploaded image gets before anything is queued, a job
through Redis, and the issue's bars on the bundled model (DGQ checkpoint shipped beside it)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import httpx
import numpy as np
import openai
import pytest
from conftest import running_api
from PIL import Image

from dgq_eval import alignment
from dgq_zoo import shapes
from service.config import Settings

pytestmark = pytest.mark.anyio

RED_CIRCLE = "a large red circle on a white background"
BLUE_CIRCLE = "a large blue circle on a white background"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _events(text: str) -> list[tuple[str, dict]]:
    """(event, data) of a server-sent event stream."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def _right_half_mask(size: int, transparent: bool) -> Image.Image:
    """Redraw the right half: transparent there (OpenAI's convention) or white there (a mask without alpha)."""
    if transparent:
        mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (size // 2, 0, size, size))
        return mask
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    return mask


def _photo(size: int) -> Image.Image:
    """A deterministic colourful image (a gradient), so that kept pixels are told apart from redrawn ones."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), 255 - ramp[None, :].repeat(size, 0)], -1)
    return Image.fromarray(pixels.astype(np.uint8))


# --- the tiny model: the official client, the checks, Redis ---


async def test_openai_client_edits_with_and_without_mask_and_streams_partial_images(embedded_settings):
    photo = _photo(16)
    async with running_api(embedded_settings) as client:
        http_client = httpx.AsyncClient(transport=client._transport, base_url="http://testserver", timeout=120)
        api = openai.AsyncOpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http_client)

        edited = await api.images.edit(image=("photo.png", _png(photo), "image/png"), prompt="a red square",
                                       size="16x16", extra_body={"steps": 4, "seed": 1})
        whole = _pixels(base64.b64decode(edited.data[0].b64_json))
        assert whole.shape == (16, 16, 3) and np.abs(whole - np.asarray(photo)).mean() > 1, "redrawn everywhere"

        masked = await api.images.edit(
            image=("photo.png", _png(photo), "image/png"), mask=("mask.png", _png(_right_half_mask(16, True)),
                                                                "image/png"),
            prompt="a red square", n=2, response_format="b64_json", extra_body={"steps": 4, "seed": 1},
        )
        assert len(masked.data) == 2
        for image in masked.data:
            pixels = _pixels(base64.b64decode(image.b64_json))
            assert np.array_equal(pixels[:, :8], np.asarray(photo)[:, :8]), "the opaque half is kept"
            assert np.abs(pixels[:, 8:] - np.asarray(photo)[:, 8:]).mean() > 1, "the transparent half is redrawn"

        stream = await api.images.generate(prompt="a red square", stream=True, partial_images=2, size="16x16",
                                           extra_body={"steps": 12, "seed": 3})
        events = [event async for event in stream]
        assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + [
            "image_generation.completed"]
        assert [event.partial_image_index for event in events[:2]] == [0, 1]
        assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (16, 16) for e in events)
        assert events[-1].size == "16x16" and events[-1].output_format == "png"

        edit_stream = await api.images.edit(image=("photo.png", _png(photo), "image/png"), prompt="a red square",
                                            stream=True, partial_images=1, extra_body={"steps": 10, "strength": 1.0})
        kinds = [event.type async for event in edit_stream]
        assert kinds == ["image_edit.partial_image", "image_edit.completed"]

        with pytest.raises(openai.UnprocessableEntityError, match="mask is 8x8 but init_image is 16x16"):
            await api.images.edit(image=("photo.png", _png(photo), "image/png"), prompt="a red square",
                                  mask=("mask.png", _png(_right_half_mask(8, True)), "image/png"))


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (a few bytes of data: it would decode to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("body", "files", "status", "says"), [
    ({"init_image": "not base64!"}, {}, 422, "init_image is not valid base64"),
    ({"init_image": _b64(b"GIF89a not a png")}, {}, 422, "init_image is not a PNG, JPEG or WebP image"),
    ({"init_image": _b64(_png(_photo(16))[:60])}, {}, 422, "init_image could not be decoded"),
    ({"init_image": _b64(_bomb_png(5_000, 5_000))}, {}, 422,
     "init_image is 5000x5000 pixels, above the limit of 16777216 pixels (max_input_pixels)"),
    ({"init_image": _b64(_bomb_png(50_000, 50_000))}, {}, 422,
     "init_image is more than 178956970 pixels, above the limit of 16777216 pixels (max_input_pixels)"),
    ({"init_image": _b64(_png(_photo(16))), "mask": _b64(_png(_right_half_mask(24, False)))}, {}, 422,
     "mask is 24x24 but init_image is 16x16: send a mask of the image's size"),
    ({"init_image": _b64(_png(_photo(16))), "mask": _b64(_png(Image.new("L", (16, 16), 0)))}, {}, 422,
     "mask marks no pixel to redraw"),
    ({"mask": _b64(_png(_right_half_mask(16, False)))}, {}, 422, "mask needs init_image"),
    ({"strength": 0.5}, {}, 422, "strength applies to init_image"),
    ({"init_image": _b64(_png(_photo(16))), "strength": 0.1, "steps": 4}, {}, 422,
     "strength 0.1 of 4 steps runs no step"),
    ({"scheduler": "lcm"}, {}, 422, "scheduler 'lcm' is not available for model"),
    ({"scheduler": "heun"}, {}, 422, "scheduler: Input should be 'ddim'"),
    ({"preview_every": 2}, {}, 422, "preview_every 2 is below the deployment's preview_every_steps 4"),
    ({}, {"init_image": b"\x00" * 10}, 422, "init_image is not a PNG, JPEG or WebP image"),
    ({}, {"init_image": _png(_photo(16)), "prompt": b"uploaded as a file"}, 422,
     "prompt: only init_image and mask may be files"),
], ids=["not-base64", "gif", "truncated", "bomb", "huge-bomb", "mask-size", "mask-empty", "mask-alone", "strength-alone",
        "no-step", "lcm", "unknown-sampler", "previews-too-often", "multipart-garbage", "multipart-file-field"])
async def test_bad_images_and_fields_are_refused_before_anything_is_queued(embedded_settings, body, files, status,
                                                                          says):
    embedded_settings.embedded_worker = False
    async with running_api(embedded_settings, wait_ready=False) as client:
        fields = {"prompt": "a red square"} | body
        if files:
            response = await client.post("/generate", data={k: str(v) for k, v in fields.items() if k not in files},
                                         files={name: (name, data) for name, data in files.items()})
        else:
            response = await client.post("/generate", json=fields)
        assert response.status_code == status and says in response.json()["detail"], response.text
        stats = await client.app.state.service.queue.stats(embedded_settings.default_model)
        assert stats.depth == 0, "nothing was queued"


async def test_other_body_types_are_415(embedded_settings):
    embedded_settings.embedded_worker = False
    async with running_api(embedded_settings, wait_ready=False) as client:
        response = await client.post("/generate", content=b"prompt=x",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415 and "send application/json" in response.json()["detail"]


async def test_an_inpainting_job_through_redis_with_previews(tiny_sd_model_dir, redis_url):
    """Edit images (safetensors in the job hash) and preview events (in the job's event stream) through Redis."""
    settings = Settings(model=str(tiny_sd_model_dir), quantized="none", redis_url=redis_url, embedded_worker=True,
                        warmup_steps=1, _env_file=None)
    photo = _photo(16)
    async with running_api(settings) as client:
        accepted = await client.post("/generate", data={"prompt": "a red square", "steps": "8", "seed": "5",
                                                        "scheduler": "euler_ancestral", "async": "true"},
                                     files={"init_image": ("photo.png", _png(photo)),
                                            "mask": ("mask.png", _png(_right_half_mask(16, False)))})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        events = _events((await client.get(f"/jobs/{job_id}/events")).text)
        previews = [data for event, data in events if event == "preview"]
        assert [data["step"] for data in previews] == [4], "a preview every 4 steps, none at the last"
        assert events[-1][0] == "succeeded"
        image = _pixels((await client.get(f"/jobs/{job_id}/images/0")).content)
        assert np.array_equal(image[:, :8], np.asarray(photo)[:, :8])
        metrics = (await client.get("/metrics")).text
    submitted = f'dgq_jobs_submitted_total{{mode="inpaint",model="{settings.default_model}",scheduler="euler_ancestral"}}'
    assert f"{submitted} 1.0" in metrics


# --- the bars, on the bundled model and its shipped DGQ checkpoint ---


@pytest.fixture
def bundled_settings(monkeypatch) -> Settings:
    for name in [name for name in __import__("os").environ if name.startswith("DGQ_") or name == "REDIS_URL"]:
        monkeypatch.delenv(name)
    return Settings(_env_file=None, warmup_steps=1, max_batch=4, batch_window_s=0.2)


async def test_bundled_image_to_image_turns_a_red_circle_blue_and_inpainting_keeps_the_other_half(bundled_settings):
    target = shapes.parse_prompt(BLUE_CIRCLE)
    red = shapes.render_scene(shapes.parse_prompt(RED_CIRCLE), seed=1)
    async with running_api(bundled_settings) as client:
        edited = await client.post("/generate", json={
            "prompt": BLUE_CIRCLE, "init_image": _b64(_png(red)), "strength": 0.8, "seed": 0, "num_images": 4,
            "guidance_scale": 5.0, "steps": 25,
        })
        assert edited.status_code == 200, edited.text
        images = [_pixels(base64.b64decode(png)).astype(np.uint8) for png in edited.json()["images"]]
        results = [alignment.score_image(image, target) for image in images]
        assert all(result.correct for result in results), [result.checks for result in results]

        mask = _right_half_mask(32, transparent=False)
        inpainted = await client.post("/generate", data={"prompt": BLUE_CIRCLE, "seed": "0", "steps": "25",
                                                         "guidance_scale": "5"},
                                      files={"init_image": ("red.png", _png(red)), "mask": ("mask.png", _png(mask))})
        assert inpainted.status_code == 200, inpainted.text
        pixels, original = _pixels(inpainted.content), np.asarray(red).astype(np.int16)
        assert np.abs(pixels[:, :16] - original[:, :16]).max() == 0, "the unmasked half is the original"
        assert np.abs(pixels[:, 16:] - original[:, 16:]).mean() > 5, "the masked half is redrawn"


async def test_bundled_previews_arrive_before_the_image_and_get_closer_to_it(bundled_settings):
    async with running_api(bundled_settings) as client:
        accepted = await client.post("/generate", json={"prompt": "a red square above a blue circle on a white "
                                                        "background", "steps": 20, "seed": 4, "async": True})
        job_id = accepted.json()["id"]
        events = _events((await client.get(f"/jobs/{job_id}/events")).text)
        final = _pixels((await client.get(f"/jobs/{job_id}/images/0")).content)
    names = [event for event, _ in events]
    previews = [(data["step"], _pixels(base64.b64decode(data["image"]))) for event, data in events
                if event == "preview"]
    assert len(previews) >= 3 and names.index("succeeded") > names.index("preview")
    assert [step for step, _ in previews] == [4, 8, 12, 16]
    distances = [float(np.abs(image - final).mean()) for _, image in previews]
    assert distances == sorted(distances, reverse=True) and distances[-1] < distances[0], distances


async def test_bundled_every_listed_sampler_generates(bundled_settings):
    """Each sampler draws the scene (their quality over many prompts is measured in docs/zoo_quality.md)."""
    prompt = "a large red square on a white background"
    async with running_api(bundled_settings) as client:
        samplers = (await client.get("/v1/models")).json()["data"][0]["samplers"]
        assert samplers == ["ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "unipc"]
        images = {}
        for sampler in samplers:
            response = await client.post("/generate", json={"prompt": prompt, "scheduler": sampler, "seed": 2,
                                                            "steps": 20, "guidance_scale": 5.0})
            assert response.status_code == 200, (sampler, response.text)
            images[sampler] = _pixels(response.content).astype(np.uint8)
    scene = shapes.parse_prompt(prompt)
    checks = {sampler: alignment.score_image(image, scene).checks for sampler, image in images.items()}
    assert sum(all(c.values()) for c in checks.values()) >= len(samplers) - 1, checks
    assert len({image.tobytes() for image in images.values()}) == len(samplers), "each sampler draws its own"


@pytest.fixture(scope="module")
def tiny_inpainting_model_dir(tmp_path_factory) -> str:
    """A tiny SD inpainting model: its UNet takes 9 channels (latents, mask, masked image latents)."""
    from conftest import build_tiny_sd_pipeline
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    work_dir = tmp_path_factory.mktemp("tiny-inpainting")
    base = build_tiny_sd_pipeline(work_dir)
    unet = UNet2DConditionModel(**{**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.save_pretrained(work_dir / "model")
    return str(work_dir / "model")


async def test_an_inpainting_model_with_a_9_channel_unet(tiny_inpainting_model_dir):
    settings = Settings(model=tiny_inpainting_model_dir, quantized="none", warmup_steps=1, _env_file=None)
    photo = _photo(16)
    async with running_api(settings) as client:
        refused = await client.post("/generate", json={"prompt": "a red square", "steps": 3})
        assert refused.status_code == 422 and "send init_image and mask" in refused.json()["detail"]
        inpainted = await client.post("/generate", data={"prompt": "a red square", "steps": "3", "seed": "1"},
                                      files={"init_image": ("photo.png", _png(photo)),
                                             "mask": ("mask.png", _png(_right_half_mask(16, False)))})
    assert inpainted.status_code == 200, inpainted.text
    pixels = _pixels(inpainted.content)
    assert np.array_equal(pixels[:, :8], np.asarray(photo)[:, :8]) and np.abs(pixels[:, 8:] - np.asarray(photo)[:, 8:]).mean() > 1
