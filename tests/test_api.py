"""The HTTP API in the embedded mode (in-process queue and worker), through httpx."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re

import numpy as np
import pytest
import torch
from conftest import running_api
from PIL import Image

from dgq_core import from_pretrained
from dgq_eval.metrics import psnr
from service import metrics
from service.auth import hash_api_key
from service.config import BUNDLED_MODEL, Settings
from service.served_model import quantized_checkpoint, shipped_quantized_dir

pytestmark = pytest.mark.anyio

REQUEST = {"prompt": "a red square", "steps": 3, "seed": 7}


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


async def test_generate_sync_png_and_several_as_json(embedded_settings):
    async with running_api(embedded_settings) as client:
        single = await client.post("/generate", json=REQUEST)
        assert single.status_code == 200 and single.headers["content-type"] == "image/png"
        assert _png_size(single.content) == (16, 16)

        several = await client.post("/generate", json=REQUEST | {"num_images": 2, "width": 24, "height": 32})
        assert several.status_code == 200
        body = several.json()
        assert body["seeds"] == [7, 8]
        pngs = [base64.b64decode(image) for image in body["images"]]
        assert [_png_size(png) for png in pngs] == [(24, 32), (24, 32)] and pngs[0] != pngs[1]

        again = await client.post("/generate", json=REQUEST)
        assert again.content == single.content, "same parameters and seed -> same image"


async def test_default_settings_serve_the_bundled_dgq_model_as_the_pipeline_does(monkeypatch):
    """What `make serve` runs (`dgq-serve` without settings): the bundled model with the DGQ checkpoint shipped
    beside it (nothing quantized at startup), in-process queue and worker; the image is the pipeline's own."""
    for name in [name for name in os.environ if name.startswith("DGQ_") or name == "REDIS_URL"]:
        monkeypatch.delenv(name)
    settings = Settings(_env_file=None, warmup_steps=1)
    assert (settings.model, settings.quantized, settings.worker_in_api) == (BUNDLED_MODEL, "auto", True)
    checkpoint = quantized_checkpoint(settings)
    model_ref = settings.served_models[BUNDLED_MODEL].model_ref
    assert checkpoint == str(shipped_quantized_dir(model_ref))
    request = {"prompt": "a red circle above a blue square on a yellow background", "seed": 1, "steps": 4}
    async with running_api(settings) as client:
        served = await client.post("/generate", json=request)
    assert served.status_code == 200 and served.headers["content-type"] == "image/png", served.text
    served_image = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"))
    assert served_image.shape == (32, 32, 3), "the bundled model's native size"

    direct = from_pretrained(model_ref, quantized=checkpoint)(
        request["prompt"], num_inference_steps=request["steps"], guidance_scale=7.5,
        generator=torch.Generator().manual_seed(request["seed"]), output_type="np",
    ).images[0]
    # The worker pads small GEMMs for batch invariance, so float rounding may differ from the plain pipeline's.
    assert psnr(served_image, (direct * 255).round().astype(np.uint8)) >= 35.0


async def test_generate_async_then_poll_image_and_events(embedded_settings):
    async with running_api(embedded_settings) as client:
        accepted = await client.post("/generate", json=REQUEST, headers={"Prefer": "respond-async"})
        assert accepted.status_code == 202
        job_id, location = accepted.json()["id"], accepted.headers["location"]
        assert location == f"/jobs/{job_id}" == accepted.json()["location"]

        events = await client.get(f"/jobs/{job_id}/events")
        assert events.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in events.text.splitlines() if line.startswith("event: ")]
        assert names == ["queued", "started", "step", "step", "step", "succeeded"]

        state = (await client.get(location)).json()
        assert state["status"] == "succeeded" and state["position"] is None
        assert {"text_encode_s", "queue_wait_s", "denoise_s", "decode_s", "total_s"} <= set(state["timings"])
        image = await client.get(state["images"][0])
        assert image.status_code == 200 and image.content == (await client.post("/generate", json=REQUEST)).content

        body_async = await client.post("/generate", json=REQUEST | {"async": True})
        assert body_async.status_code == 202


async def test_unknown_expired_and_missing_images(embedded_settings):
    embedded_settings.result_ttl_s = 0.3
    async with running_api(embedded_settings) as client:
        assert (await client.get("/jobs/nope")).status_code == 404
        assert (await client.get("/jobs/nope/images/0")).status_code == 404
        done = await client.post("/generate", json=REQUEST)
        job_id = done.headers["x-job-id"]
        assert (await client.get(f"/jobs/{job_id}/images/1")).status_code == 404
        await asyncio.sleep(0.4)
        for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/images/0"):
            gone = await client.get(path)
            assert gone.status_code == 410 and "submit it again" in gone.json()["detail"]


async def test_cancel_running_job_is_idempotent(embedded_settings):
    embedded_settings.heartbeat_interval_s = 0.05  # how often a worker looks for cancellations
    async with running_api(embedded_settings) as client:
        job_id = (await client.post("/generate", json=REQUEST | {"steps": 100, "width": 32, "height": 32,
                                                                 "async": True})).json()["id"]
        while (await client.get(f"/jobs/{job_id}")).json()["status"] == "queued":
            await asyncio.sleep(0.01)
        first = await client.post(f"/jobs/{job_id}/cancel")
        assert first.status_code == 200 and first.json()["status"] in ("running", "cancelled")
        final = await client.get(f"/jobs/{job_id}/events")
        assert final.text.rstrip().splitlines()[-2] == "event: cancelled"
        steps = final.text.count("event: step")
        assert steps < 100, "the denoising loop stopped early"
        again = await client.post(f"/jobs/{job_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


async def test_cancel_queued_job(embedded_settings):
    embedded_settings.embedded_worker = False
    async with running_api(embedded_settings, wait_ready=False) as client:
        job_id = (await client.post("/generate", json=REQUEST | {"async": True})).json()["id"]
        cancelled = await client.post(f"/jobs/{job_id}/cancel")
        assert cancelled.json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"width": 30}, "width: Input should be a multiple of 8"),
        ({"height": 2048}, "height 2048 is above the limit 48 of model"),
        ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"steps": 101}, "ask for at most 100"),
        ({"guidance_scale": 50}, "guidance_scale: Input should be less than or equal to 30"),
        ({"num_images": 9}, "num_images 9 is above the limit 4"),
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"prompt": "a" * 200}, "the text encoder reads at most 77"),
        ({"negative_prompt": "b" * 80}, "negative_prompt is 82 tokens long"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
async def test_bad_input_is_422_saying_what_to_change(embedded_settings, change, says):
    embedded_settings.embedded_worker = False
    async with running_api(embedded_settings, wait_ready=False) as client:
        response = await client.post("/generate", json=REQUEST | change)
        assert response.status_code == 422
        assert says in response.json()["detail"]


async def test_an_embedded_worker_that_cannot_load_is_logged_and_not_ready(embedded_settings, caplog):
    embedded_settings.device = "cpu:not-a-device"  # the front stage loads on the CPU regardless
    async with running_api(embedded_settings, wait_ready=False) as client:
        deadline = asyncio.get_running_loop().time() + 60
        while not [r for r in caplog.records if r.name == "service.api.app" and r.levelname == "ERROR"]:
            assert asyncio.get_running_loop().time() < deadline, "the worker's failure was not logged"
            await asyncio.sleep(0.05)
        not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503 and "embedded_worker_warm" in not_ready.json()["detail"]
    [record] = [r for r in caplog.records if r.name == "service.api.app"]
    assert "embedded worker stopped" in record.getMessage() and "not-a-device" in record.getMessage()


async def test_full_queue_is_429_with_retry_after(embedded_settings):
    embedded_settings.embedded_worker, embedded_settings.queue_max = False, 2
    async with running_api(embedded_settings, wait_ready=False) as client:
        for _ in range(2):
            assert (await client.post("/generate", json=REQUEST | {"async": True})).status_code == 202
        full = await client.post("/generate", json=REQUEST | {"async": True})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "retry" in full.json()["detail"]
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and "live_worker" in not_ready.json()["detail"]
        assert "retry-after" in not_ready.headers


async def test_api_keys(embedded_settings):
    embedded_settings.api_keys = [hash_api_key("first-key-0123456789"), hash_api_key("second-key-0123456789")]
    async with running_api(embedded_settings) as client:
        assert (await client.post("/generate", json=REQUEST)).status_code == 401
        wrong = await client.post("/generate", json=REQUEST, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "Authorization: Bearer" in wrong.json()["detail"]
        stored_hash = embedded_settings.api_keys[1].get_secret_value()
        as_hash = await client.post("/generate", json=REQUEST, headers={"Authorization": f"Bearer {stored_hash}"})
        assert as_hash.status_code == 401, "the stored hash is not a key"
        ok = await client.post("/generate", json=REQUEST, headers={"Authorization": "Bearer second-key-0123456789"})
        assert ok.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401


async def test_health_docs_and_metrics(embedded_settings):
    async with running_api(embedded_settings) as client:
        assert (await client.get("/healthz")).json() == {"status": "alive"}
        ready = (await client.get("/readyz")).json()
        name = embedded_settings.default_model
        assert all(ready.values()) and {f"embedded_worker_warm:{name}", f"live_worker:{name}"} <= set(ready)
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/redoc")).status_code == 404, "ReDoc would load from a CDN"
        schema = (await client.get("/openapi.json")).json()
        assert {"/generate", "/jobs/{job_id}", "/jobs/{job_id}/events", "/v1/images/generations",
                "/v1/models"} <= set(schema["paths"])
        await client.post("/generate", json=REQUEST)
        await asyncio.sleep(1.1)  # queue gauges are refreshed every second
        text = (await client.get("/metrics")).text
    defined = [m for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "describe")]
    assert len(defined) >= 18
    for metric in defined:
        assert f"# HELP {metric._name}" in text, f"{metric._name} is not exported"
    assert 'dgq_http_request_duration_seconds_count{method="POST",route="/generate",status="200"}' in text
    assert f'dgq_model_weight_bytes{{component="unet",model="{name}",precision="float32"}}' in text
    assert f'dgq_jobs_total{{model="{name}",outcome="succeeded"}}' in text
    assert f'dgq_queue_depth_jobs{{model="{name}"}} 0.0' in text
    [info] = [line for line in text.splitlines() if line.startswith("dgq_model_info{") and f'model="{name}"' in line]
    assert 'exec_mode="none"' in info and 'quant_method="none"' in info
    # The full-precision model has no quantized layers, so nothing runs in integers.
    assert 'int_kernels="none"' in text and 'int_layers="0/0"' in text


async def test_docs_load_swagger_ui_from_this_server(embedded_settings):
    """/docs works offline: every script, style and icon it references is served here and answers 200."""
    embedded_settings.embedded_worker = False
    async with running_api(embedded_settings, wait_ready=False) as client:
        page = (await client.get("/docs")).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', page) + re.findall(r"url: '([^']+)'", page)
        assert len(urls) == 4 and not re.search(r"https?://", page), page
        for url in urls:
            assert url.startswith("/") and (await client.get(url)).status_code == 200, url
        assert '"validatorUrl": null' in page, "Swagger UI would send the schema to validator.swagger.io"
        assert (await client.get("/docs/assets/index.html")).status_code == 404, "only the page's assets"


async def test_openai_client(embedded_settings):
    import httpx
    import openai

    embedded_settings.api_keys = [hash_api_key("sk-test-0123456789abcdef")]
    async with running_api(embedded_settings) as client:
        http_client = httpx.AsyncClient(transport=client._transport, base_url="http://testserver")
        api = openai.AsyncOpenAI(api_key="sk-test-0123456789abcdef", base_url="http://testserver/v1", http_client=http_client)
        models = await api.models.list()
        assert [model.id for model in models.data] == [embedded_settings.model]
        result = await api.images.generate(prompt="a red square", n=2, size="24x16", response_format="b64_json")
        pngs = [base64.b64decode(image.b64_json) for image in result.data]
        assert [_png_size(png) for png in pngs] == [(24, 16), (24, 16)]
        by_url = await api.images.generate(prompt="a red square", size="16x16", response_format="url")
        url = by_url.data[0].url
        assert url.startswith("http://testserver/jobs/")
        assert (await http_client.get(url, headers={"Authorization": "Bearer sk-test-0123456789abcdef"})).status_code == 200
        with pytest.raises(openai.UnprocessableEntityError, match="multiples of 8"):
            await api.images.generate(prompt="a red square", size="20x20")
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(api_key="wrong", base_url="http://testserver/v1",
                                     http_client=http_client).models.list()


async def test_concurrent_requests_with_prompts_of_different_lengths(embedded_settings):
    """The front stage serializes tokenizer use (a fast tokenizer's padding mode is shared state)."""
    prompts = ["a", "a red square on a blue background with a green star", "xyz" * 10, "b"] * 3
    async with running_api(embedded_settings) as client:
        accepted = await asyncio.gather(
            *(client.post("/generate", json=REQUEST | {"prompt": p, "async": True}) for p in prompts)
        )
        assert [response.status_code for response in accepted] == [202] * len(prompts)
        for response in accepted:
            events = (await client.get(f"/jobs/{response.json()['id']}/events")).text
            assert events.rstrip().splitlines()[-2] == "event: succeeded", events


async def test_a_prompt_that_is_also_its_negative_prompt_generates(embedded_settings):
    # Both come from the prompt cache as one tensor, which the job payload must still be able to hold twice.
    async with running_api(embedded_settings) as client:
        same = await client.post("/generate", json=REQUEST | {"negative_prompt": REQUEST["prompt"]})
        assert same.status_code == 200 and same.headers["content-type"] == "image/png"
