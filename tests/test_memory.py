"""Memory-bounded generation: the attention's score footprint, the worker's measured and fitted memory, admission
that refuses with the figures what would not fit, batches kept within the memory, and every size up to each model's
limits answered 200 or 4xx (the tiny and the bundled model, both generation routes); the peak RSS of the largest
request a real `dgq-worker` admits, against what it measured."""

from __future__ import annotations

import base64
import io
import itertools
import json
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from conftest import TINY_BYTES_PER_ROW_PIXEL, budget_for, running_api
from diffusers import StableDiffusionPipeline
from local_cluster import ServiceProcesses
from PIL import Image

import dgq_core
from dgq_core import attention
from dgq_zoo import bundled_model_dir
from service.config import Settings
from service.memory import MIB, MemoryProfile, fit_upper
from service.queue import keys, wire
from service.queue.base import QueuedJob
from service.schemas import JobSpec
from service.worker import compatible_batches

PROMPT = "a red square"


def figure(test: str, text: str) -> None:
    print(f"\nFIGURE {test}: {text}")


# --- the attention's scores, the fit ---


@pytest.mark.parametrize(("size", "budget"), [(32, 64 << 20), (32, 96 << 10), (40, 8 << 10)])
def test_scores_footprint_is_the_largest_block_the_attention_materializes(tiny_dgq_checkpoint_dir, size, budget):
    """Whole (64 MiB), in blocks of query rows (96 KiB) and at the 64-row floor above the budget (8 KiB): the
    footprint's bytes are those of the largest scores tensor a UNet call of the DGQ pipeline materializes."""
    pipe = dgq_core.from_pretrained(tiny_dgq_checkpoint_dir, exec_mode="fake")
    dgq_core.set_attention_budget(pipe.unet, budget)
    footprint = dgq_core.scores_footprint(pipe.unet)
    assert (footprint.heads, footprint.downscale, footprint.budget_bytes) == (8, 1, budget)
    seen = []
    materialize = attention._attention_scores

    def record(query, key, scale):
        scores = materialize(query, key, scale)
        seen.append(scores.numel() * scores.element_size())
        return scores

    latent = size // pipe.vae_scale_factor
    inputs = {"sample": torch.randn(2, 4, latent, latent), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(2, 77, 32)}
    attention._attention_scores = record
    try:
        with torch.inference_mode():
            pipe.unet(**inputs)
    finally:
        attention._attention_scores = materialize
    assert max(seen) == footprint.bytes(2, latent, latent)


def test_a_full_precision_unet_materializes_no_scores(tiny_sd_model_dir):
    """diffusers' SDPA processor runs fused kernels: nothing quadratic to count."""
    unet = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir).unet
    assert dgq_core.scores_footprint(unet) == dgq_core.ScoresFootprint(heads=8, downscale=1, budget_bytes=None)
    assert dgq_core.scores_footprint(unet).bytes(2, 64, 64) == 0


def test_fit_covers_every_measurement_and_recovers_a_known_cost():
    """Costs made of a constant, a rows x pixels term and the scores (with noise): the fit is close to them and
    lies on or above every measurement; with one or two measurements it is proportional, or a line."""
    rng = np.random.default_rng(0)
    rows_pixels = np.array([2048.0, 4096, 8192, 16384, 4096])
    scores = np.array([1e5, 2e5, 8e5, 2.6e6, 4e5])
    features = np.stack([np.ones(5), rows_pixels, scores], axis=1)
    truth = np.array([20e6, 3000.0, 1.5])
    measured = features @ truth + rng.normal(0, 2e5, 5)
    fitted = fit_upper(features, measured)
    assert np.all(features @ fitted >= measured - 1e-3), "no measurement above the fit"
    assert abs(fitted[1] - truth[1]) / truth[1] < 0.1 and fitted[0] > 0
    one = fit_upper(features[:1], measured[:1])
    assert one[0] == 0 and one[2] == 0 and one[1] * rows_pixels[0] == pytest.approx(measured[0])
    two = fit_upper(features[:2], measured[:2])
    assert two[2] == 0 and np.allclose(features[:2] @ two, measured[:2])


def _profile(budget_mib: float) -> MemoryProfile:
    return MemoryProfile(
        worker_id="w", device="cpu", held_bytes=500 * MIB, budget_bytes=int(budget_mib * MIB), budget_source="test",
        vae_scale_factor=8, scores=dgq_core.ScoresFootprint(heads=8, downscale=1, budget_bytes=256 << 20),
        denoise=(20 * MIB, 300.0, 1.0), decode=(30 * MIB, 200.0),
    )


def test_refusals_say_what_is_needed_what_the_worker_has_and_what_would_fit():
    profile = _profile(budget_mib=600)
    need = profile.request_bytes(512, 512, 2, 7.5)
    # 20 MiB + 4 rows x 262144 px x 300 B + the scores, blocked to the 256 MiB budget; x 1.15
    assert need == int(np.ceil(1.15 * (20 * MIB + 300 * 4 * 512 * 512 + (256 << 20))))
    refusal = profile.refusal(512, 512, 2, 7.5)
    assert refusal.startswith(f"this request (2 image(s) of 512x512 with guidance) needs about {need / MIB:.0f} MiB")
    assert "more than the 600 MiB worker w has for requests" in refusal
    assert refusal.endswith("ask for at most 1 image(s) of this size (or send several requests)")
    assert profile.refusal(512, 512, 1, 7.5) is None and profile.refusal(512, 512, 2, 1.0) is None, "no guidance"
    one = _profile(budget_mib=100).refusal(512, 512, 1, 7.5)
    width, height = (int(side) for side in one.rpartition(" ")[2].split("x"))
    assert _profile(100).fits(width, height, 1, 7.5) and not _profile(100).fits(width + 8, height + 8, 1, 7.5)
    assert "even the smallest image" in _profile(budget_mib=10).refusal(64, 64, 1, 7.5)


def test_compatible_batches_stay_within_what_fits():
    specs = [JobSpec(id=f"j{n}", model="m", width=64, height=64, steps=2, guidance_scale=7.5, seed=n, num_images=images,
                     scheduler="model-default") for n, images in enumerate([1, 1, 1, 2, 1])]
    jobs = [QueuedJob(spec=spec, payload=b"", model="m") for spec in specs]
    batches = [[job.spec.id for job in batch] for batch in compatible_batches(jobs, 4, lambda spec: 2)]
    assert batches == [["j0", "j1"], ["j2"], ["j3"], ["j4"]]
    assert len(compatible_batches(jobs, 4)) == 2, "without a memory bound only max_batch splits"


# --- the API and the embedded worker ---


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


async def _sweep(client: httpx.AsyncClient, sides: list[int], steps: list[int], images: list[int]) -> dict[str, int]:
    """Every (width, height, steps, images) on both routes: 200 with images of that size within the model's limits
    and the worker's memory, else 422 saying which limit or how much memory; never anything else."""
    [model] = (await client.get("/v1/models")).json()["data"]
    limits = model["limits"]
    profile: MemoryProfile = client.app.state.service.workers[0].memory_profile
    answers = {"served": 0, "over a limit": 0, "over the memory": 0}
    for width, height, step_count, count in itertools.product(sides, sides, steps, images):
        over_limit = (width > limits["max_width"] or height > limits["max_height"]
                      or width * height > limits["max_pixels"] or step_count > limits["max_steps"]
                      or count > limits["max_num_images"])
        refusal = profile.refusal(width, height, count, 7.5)
        for route in ("/generate", "/v1/images/generations"):
            if route == "/generate":
                body = {"prompt": PROMPT, "width": width, "height": height, "steps": step_count, "num_images": count,
                        "seed": 1}
            else:
                body = {"prompt": PROMPT, "size": f"{width}x{height}", "steps": step_count, "n": count, "seed": 1}
            response = await client.post(route, json=body)
            what = f"{route} {body}: {response.status_code} {response.text[:300]}"
            if over_limit:
                assert response.status_code == 422 and "above the limit" in response.json()["detail"], what
                answers["over a limit"] += 1
            elif refusal:
                assert response.status_code == 422, what
                assert response.json()["type"] == "InsufficientMemory" and response.json()["detail"] == refusal, what
                answers["over the memory"] += 1
            else:
                assert response.status_code == 200, what
                if route == "/generate":
                    pngs = [response.content] if count == 1 else [base64.b64decode(i) for i in response.json()["images"]]
                else:
                    pngs = [base64.b64decode(image["b64_json"]) for image in response.json()["data"]]
                assert [_png_size(png) for png in pngs] == [(width, height)] * count, what
                answers["served"] += 1
    return answers


async def _with_budget(client: httpx.AsyncClient, width: int, height: int, images: int, *,
                       bytes_per_row_pixel: float | None = None) -> MemoryProfile:
    """`budget_for` the embedded worker (guidance on), published as the worker publishes its own profile."""
    worker = client.app.state.service.workers[0]
    profile = budget_for(worker, width, height, images, 7.5, bytes_per_row_pixel=bytes_per_row_pixel)
    await client.app.state.service.queue.publish_memory_profile(worker.model_name, profile)
    return profile


@pytest.mark.anyio
async def test_every_size_up_to_the_tiny_models_limits_is_served_or_refused_with_a_4xx(tiny_sd_model_dir):
    model = str(tiny_sd_model_dir)
    settings = Settings(model=model, quantized="none", warmup_steps=1, batch_window_s=0.01,
                        model_limits={model: {"max_steps": 3, "max_num_images": 3}}, _env_file=None)
    async with running_api(settings) as client:
        [listed] = (await client.get("/v1/models")).json()["data"]
        assert listed["native_width"] == 16 and listed["limits"] == {
            "max_width": 48, "max_height": 48, "max_pixels": 1024, "max_steps": 3, "max_num_images": 3,
        }, "sides 3x and area 4x the native 16x16, steps and images as set"
        info = (await client.get("/playground/info")).json()
        assert (info["max_width"], info["max_pixels"], info["max_steps"]) == (48, 1024, 3), "the playground's inputs"
        profile = await _with_budget(client, 32, 32, 2, bytes_per_row_pixel=TINY_BYTES_PER_ROW_PIXEL)
        assert not profile.fits(32, 32, 3, 7.5)
        answers = await _sweep(client, [8, 16, 32, 48, 56], [1, 3], [1, 3])
        beyond = Counter(await _sweep(client, [16], [4], [1])) + Counter(await _sweep(client, [16], [1], [4]))
    assert beyond == {"over a limit": 4}, "one step more, one image more: both routes"
    assert answers["served"] and answers["over a limit"] and answers["over the memory"], answers
    figure("tiny model sweep", f"{sum(answers.values())} requests: {answers}, no other status")


@pytest.mark.anyio
async def test_every_size_up_to_the_bundled_models_limits_is_served_or_refused_with_a_4xx():
    """The bundled model with its shipped DGQ checkpoint (quantized attention), a budget that admits one 64x64
    image but not four."""
    settings = Settings(warmup_steps=1, batch_window_s=0.01, _env_file=None, model_limits={"bundled": {"max_steps": 2}})
    async with running_api(settings) as client:
        assert client.app.state.service.workers[0].memory_profile.scores.budget_bytes == 256 << 20, \
            "the DGQ attention's scores budget"
        profile = await _with_budget(client, 64, 64, 1)
        assert not profile.fits(64, 64, 4, 7.5)
        answers = await _sweep(client, [32, 64, 96], [2, 3], [1, 4])
    assert answers["served"] and answers["over a limit"] and answers["over the memory"], answers
    figure("bundled model sweep", f"{sum(answers.values())} requests: {answers}, no other status")


@pytest.mark.anyio
async def test_batches_are_split_to_fit_the_memory(tiny_sd_model_dir):
    """Four single-image jobs submitted together (max_batch 4), with memory for two of them: two batches of two."""
    settings = Settings(model=str(tiny_sd_model_dir), quantized="none", warmup_steps=1, batch_window_s=0.5,
                        _env_file=None)
    async with running_api(settings) as client:
        profile = await _with_budget(client, 32, 32, 2, bytes_per_row_pixel=TINY_BYTES_PER_ROW_PIXEL)
        assert profile.images_that_fit(32, 32, 7.5, 4) == 2
        bodies = [{"prompt": PROMPT, "width": 32, "height": 32, "steps": 2, "seed": n, "async": True} for n in range(4)]
        ids = [(await client.post("/generate", json=body)).json()["id"] for body in bodies]
        batches = []
        for job_id in ids:
            assert "event: succeeded" in (await client.get(f"/jobs/{job_id}/events")).text
            batches.append((await client.get(f"/jobs/{job_id}")).json()["timings"]["batch_images"])
    assert batches == [2, 2, 2, 2]


# --- a real worker process ---


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_peak_rss_of_the_largest_admitted_request_is_within_the_workers_measurements(redis_url, tmp_path):
    """A `dgq-worker` on the bundled DGQ model with 100 MiB for requests: the largest request it admits (by the
    memory it measured at warm-up) runs with a peak RSS within what it holds plus that budget, and within its own
    estimate; the next larger one is refused with both figures."""
    cluster = ServiceProcesses(bundled_model_dir(), redis_url, tmp_path, {
        "quantized": "auto", "request_memory_mb": 100, "max_batch": 4, "batch_window_s": 0.01,
    })
    cluster.start_api()
    worker = cluster.start_worker("rss")
    try:
        cluster.wait_ready({"rss"})
        with redis.Redis.from_url(redis_url) as client_redis:
            profile = wire.decode_memory_profile(client_redis.hget(keys.worker_memory(cluster.model), "rss"))
        limits = httpx.get(f"{cluster.base_url}/v1/models").json()["data"][0]["limits"]
        sides = range(8, limits["max_width"] + 1, 8)
        shapes = [(width, height, count) for width, height in itertools.product(sides, sides)
                  for count in range(1, limits["max_num_images"] + 1) if width * height <= limits["max_pixels"]]
        admitted = [shape for shape in shapes if profile.fits(*shape, 7.5)]
        width, height, count = max(admitted, key=lambda shape: profile.request_bytes(*shape, 7.5))
        refused = min(set(shapes) - set(admitted), key=lambda shape: profile.request_bytes(*shape, 7.5))
        Path(f"/proc/{worker.pid}/clear_refs").write_text("5")
        body = {"prompt": PROMPT, "width": width, "height": height, "num_images": count, "steps": 2, "seed": 3}
        response = httpx.post(f"{cluster.base_url}/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        peak = _peak_rss(worker.pid)
        estimate = profile.request_bytes(width, height, count, 7.5)
        assert peak <= profile.held_bytes + profile.budget_bytes, "within the model plus the budget"
        assert peak <= profile.held_bytes + estimate, "within the worker's own estimate"
        over = httpx.post(f"{cluster.base_url}/generate", json=body | dict(zip(("width", "height", "num_images"),
                                                                               refused, strict=True)))
        assert over.status_code == 422 and over.json()["type"] == "InsufficientMemory"
        assert f"needs about {profile.request_bytes(*refused, 7.5) / MIB:.0f} MiB" in over.json()["detail"]
        assert "more than the 100 MiB worker rss has for requests" in over.json()["detail"]
    finally:
        cluster.stop()
    figure("peak RSS", f"largest admitted request {count} x {width}x{height} (2 steps): worker peak RSS "
           f"{peak / MIB:.0f} MiB = {profile.held_bytes / MIB:.0f} MiB held once warm + "
           f"{(peak - profile.held_bytes) / MIB:.0f} MiB; its estimate {estimate / MIB:.0f} MiB, budget 100 MiB; "
           f"{refused[2]} x {refused[0]}x{refused[1]} refused (needs {profile.request_bytes(*refused, 7.5) / MIB:.0f} "
           "MiB)")
    print(json.dumps(profile.model_dump(), indent=None))
