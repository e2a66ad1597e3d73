"""LoRA adapters and the `model` field through the service: `GET /v1/loras`, `loras` on `/generate` and (as an
extension field) on the OpenAI route, 404 for an unknown adapter or model, and through a real Redis a LoRA job and
a plain job batched together, each giving its single-request image. The tiny model is served with its DGQ
checkpoint, so the adapters' cross-attention to_k/to_v branches go through the API's precomputed keys and values."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import running_api
from diffusers import StableDiffusionPipeline
from lora_files import random_lora_weights, write_lora
from PIL import Image

from service.config import Settings
from service.queue import make_queue
from service.schemas import MAX_LORAS_PER_REQUEST
from service.worker import Worker

pytestmark = pytest.mark.anyio

SIZE, STEPS = 16, 4
REQUEST = {"prompt": "a red square", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 3}


@pytest.fixture(scope="module")
def lora_dir(tiny_sd_model_dir, tmp_path_factory) -> Path:
    """Two adapters for the tiny model (attention projections, cross-attention to_k/to_v among them)."""
    unet = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir).unet
    directory = tmp_path_factory.mktemp("loras")
    write_lora(directory / "style.safetensors", random_lora_weights(unet, rank=4, seed=1))
    write_lora(directory / "other.safetensors", random_lora_weights(unet, rank=2, seed=2), key_format="kohya")
    (directory / "style.json").write_text('{"trigger": "ink"}')
    return directory


@pytest.fixture
def settings(tiny_sd_model_dir, tiny_dgq_checkpoint_dir, lora_dir) -> Settings:
    return Settings(model=str(tiny_sd_model_dir), quantized=str(tiny_dgq_checkpoint_dir), lora_dir=str(lora_dir),
                    warmup_steps=1, batch_window_s=0.01, _env_file=None)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


async def test_loras_are_listed_applied_and_unknown_names_or_models_get_404(settings, lora_dir):
    async with running_api(settings) as client:
        listed = (await client.get("/v1/loras")).json()["data"]
        by_name = {entry["name"]: entry for entry in listed}
        assert sorted(by_name) == ["other", "style"]
        assert by_name["style"]["rank"] == 4 and by_name["other"]["rank"] == 2
        assert by_name["style"]["description"] == {"trigger": "ink"}
        assert any(target.endswith("attn2.to_k") for target in by_name["style"]["targets"])
        assert by_name["style"]["bytes"] == (lora_dir / "style.safetensors").stat().st_size - _header_bytes(
            lora_dir / "style.safetensors")

        plain = await client.post("/generate", json=REQUEST)
        styled = await client.post("/generate", json=REQUEST | {"loras": [{"name": "style", "scale": 1.0}]})
        again = await client.post("/generate", json=REQUEST | {"loras": [{"name": "style"}]})
        both = await client.post("/generate", json=REQUEST | {"loras": [{"name": "style"}, {"name": "other",
                                                                                            "scale": -0.5}]})
        assert {r.status_code for r in (plain, styled, again, both)} == {200}, styled.text
        assert not np.array_equal(_pixels(plain.content), _pixels(styled.content)), "the adapter changes the image"
        assert styled.content == again.content, "scale 1 is the default"
        assert styled.content != both.content

        unknown = await client.post("/generate", json=REQUEST | {"loras": [{"name": "nope"}]})
        assert unknown.status_code == 404 and unknown.json()["type"] == "UnknownAdapter"
        assert "'nope'" in unknown.json()["detail"] and "other, style" in unknown.json()["detail"]
        wrong_model = await client.post("/generate", json=REQUEST | {"model": "dall-e-3"})
        assert wrong_model.status_code == 404 and wrong_model.json()["type"] == "UnknownModel"
        served = (await client.get("/v1/models")).json()["data"][0]["id"]
        assert served in wrong_model.json()["detail"]
        assert (await client.post("/generate", json=REQUEST | {"model": served})).status_code == 200

        too_many = [{"name": f"a{n}"} for n in range(MAX_LORAS_PER_REQUEST + 1)]
        for loras, problem in (
            ([{"name": "style", "scale": 9}], "less than or equal to 2"),
            (too_many, "at most 4"),
            ([{"name": "style"}, {"name": "style"}], "at most once"),
            ([{"name": "../etc/passwd"}], "pattern"),
            ("not json", "JSON list"),
        ):
            refused = await client.post("/generate", json=REQUEST | {"loras": loras})
            assert refused.status_code == 422 and problem in refused.json()["detail"], refused.text
        # a field without a file name is a text field of the multipart form
        form = await client.post("/generate", data={k: str(v) for k, v in REQUEST.items()},
                                 files={"loras": (None, '[{"name": "style"}]')})
        assert form.status_code == 200 and form.content == styled.content, "multipart carries loras as JSON text"


def _header_bytes(path: Path) -> int:
    """The safetensors header's size (8-byte length + JSON)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


async def test_openai_client_picks_loras_in_extra_body_and_unknown_models_are_refused(settings):
    async with running_api(settings) as client:
        api = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
        kwargs = {"prompt": "a red square", "size": f"{SIZE}x{SIZE}", "extra_body": {"seed": 3, "steps": STEPS}}
        plain = await api.images.generate(**kwargs)
        styled = await api.images.generate(**kwargs | {"extra_body": kwargs["extra_body"] | {
            "loras": [{"name": "style", "scale": 1.0}]}})
        assert plain.data[0].b64_json != styled.data[0].b64_json
        native = await client.post("/generate", json=REQUEST | {"loras": [{"name": "style"}]})
        assert np.array_equal(_pixels(native.content), _pixels(base64.b64decode(styled.data[0].b64_json)))
        with pytest.raises(openai.NotFoundError, match="not served here"):
            await api.images.generate(model="dall-e-3", **kwargs)
        with pytest.raises(openai.NotFoundError, match="available: other, style"):
            await api.images.generate(**kwargs | {"extra_body": {"loras": [{"name": "missing"}]}})


async def test_a_lora_job_and_a_plain_job_batched_through_redis_each_match_their_single_request_image(
    settings, redis_url
):
    """Two jobs submitted together are taken as one batch (a long batch window): rows with and without the
    adapter share every UNet call; each image is compared with the same job run alone."""
    settings = settings.model_copy(update={"redis_url": redis_url, "embedded_worker": False, "max_batch": 4,
                                           "batch_window_s": 1.0})
    queue = make_queue(settings)
    worker = Worker(settings.model_copy(update={"worker_id": "lora-worker"}), queue)
    await worker.load()  # before the API loads its text side: two checkpoint loads at once race in diffusers
    task = asyncio.create_task(worker.run())
    jobs = {"lora": REQUEST | {"loras": [{"name": "style", "scale": 0.8}]}, "plain": REQUEST | {"seed": 4}}
    try:
        async with running_api(settings) as client:
            together = await asyncio.gather(*(client.post("/generate", json=body | {"async": True})
                                              for body in jobs.values()))
            ids = [response.json()["id"] for response in together]
            states = await _wait_succeeded(client, ids)
            assert [state["timings"]["batch_images"] for state in states] == [2.0, 2.0], "one batch of both"
            batched = [(await client.get(f"/jobs/{job_id}/images/0")).content for job_id in ids]
            for body, png in zip(jobs.values(), batched, strict=True):
                [alone_id] = [(await client.post("/generate", json=body | {"async": True})).json()["id"]]
                [state] = await _wait_succeeded(client, [alone_id])
                assert state["timings"]["batch_images"] == 1.0
                assert (await client.get(f"/jobs/{alone_id}/images/0")).content == png
            assert batched[0] != batched[1]
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        await queue.close()


async def _wait_succeeded(client, job_ids: list[str], timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = [(await client.get(f"/jobs/{job_id}")).json() for job_id in job_ids]
        if all(state["status"] in ("succeeded", "failed", "cancelled") for state in states):
            assert [state["status"] for state in states] == ["succeeded"] * len(states), states
            return states
        assert time.monotonic() < deadline, states
        await asyncio.sleep(0.1)
