"""Several models behind one API (`DGQ_MODELS`): the settings' checks, models on one base sharing one text encoder,
and on a real redis-server an API process with one `dgq-worker` process per model, where the official `openai`
client picks each model by `model`, each job is run by a worker of its model, and an unknown model gets 404 naming
the served ones."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
import redis
import yaml
from conftest import running_api
from local_cluster import REPO_ROOT, ServiceProcesses, console_script, free_port, spawn
from PIL import Image
from pydantic import ValidationError

from service.api.app import STATS_INTERVAL_S, load_prompt_stages
from service.config import Settings
from service.queue import keys

pytestmark = pytest.mark.anyio

SIZE, STEPS = 16, 3
WORKERS = {"tiny-dgq": "worker-dgq", "tiny-fp": "worker-fp"}


@pytest.fixture(scope="module")
def two_models(tiny_sd_model_dir, tiny_dgq_checkpoint_dir) -> dict[str, dict[str, str]]:
    """`DGQ_MODELS`: the tiny model with its DGQ checkpoint (the default, listed first) and in full precision."""
    return {"tiny-dgq": {"model": str(tiny_sd_model_dir), "quantized": str(tiny_dgq_checkpoint_dir)},
            "tiny-fp": {"model": str(tiny_sd_model_dir), "quantized": "none"}}


def test_models_settings_are_checked(two_models):
    settings = Settings(models=two_models, _env_file=None)
    assert list(settings.served_models) == ["tiny-dgq", "tiny-fp"] and settings.default_model == "tiny-dgq"
    with pytest.raises(ValueError, match="DGQ_WORKER_MODEL"):
        _ = settings.worker_model_name  # a worker must be told which one
    assert Settings(models=two_models, worker_model="tiny-fp", _env_file=None).worker_model_name == "tiny-fp"
    assert Settings(_env_file=None).worker_model_name == "bundled", "one model: the worker serves it"
    refusals = {
        "is not one of the served models": {"models": two_models, "worker_model": "tiny"},
        "are both set": {"models": two_models, "model": "bundled"},
        "is not allowed": {"models": {"a b": {"model": "bundled"}}},
        "which this deployment does not serve": {"models": two_models, "model_limits": {"tiny": {"max_steps": 3}}},
    }
    for message, fields in refusals.items():
        with pytest.raises(ValidationError, match=message):
            Settings(**fields, _env_file=None)
    limited = Settings(models=two_models, model_limits={"tiny-fp": {"max_steps": 3}}, _env_file=None)
    assert limited.model_limits["tiny-fp"].max_steps == 3


def test_models_on_one_base_share_one_text_encoder(two_models, tiny_sd_model_dir):
    stages = load_prompt_stages(Settings(models=two_models, _env_file=None))
    dgq, fp = stages["tiny-dgq"].encoder.pipeline, stages["tiny-fp"].encoder.pipeline
    assert dgq.text_encoder is fp.text_encoder and dgq.tokenizer is fp.tokenizer
    assert stages["tiny-dgq"].encoder.cross_attention and not stages["tiny-fp"].encoder.cross_attention, \
        "each keeps its own UNet's cross-attention parameters"
    encoded_dgq, encoded_fp = (stages[name]._encode_cached(["a red square"])[0] for name in ("tiny-dgq", "tiny-fp"))
    assert encoded_dgq.embeds.equal(encoded_fp.embeds) and encoded_dgq.params and not encoded_fp.params


def _png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


async def test_embedded_mode_runs_a_worker_per_model(two_models):
    settings = Settings(models=two_models, warmup_steps=1, batch_window_s=0.01, _env_file=None)
    request = {"prompt": "a red square", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 5}
    async with running_api(settings) as client:
        ready = (await client.get("/readyz")).json()
        assert {"live_worker:tiny-dgq", "live_worker:tiny-fp"} <= set(ready) and all(ready.values())
        default, fp, dgq = await asyncio.gather(*(
            client.post("/generate", json=request | model)
            for model in ({}, {"model": "tiny-fp"}, {"model": "tiny-dgq"})
        ))
    for response in (default, fp, dgq):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    assert default.content == dgq.content, "no model = the first one"
    assert np.abs(_png_pixels(fp.content) - _png_pixels(dgq.content)).max() > 0, \
        "the full-precision and the DGQ model give different images"


@pytest.fixture(scope="module")
def cluster(two_models, redis_server, tmp_path_factory):
    """An API process and one `dgq-worker` process per model (`DGQ_WORKER_MODEL`) on one Redis."""
    redis_server.flush()
    running = ServiceProcesses(None, redis_server.url, tmp_path_factory.mktemp("models-logs"), {
        "models": two_models, "batch_window_s": 0.05, "heartbeat_interval_s": 0.5, "worker_ttl_s": 3,
    })
    running.start_api()
    for model, worker in WORKERS.items():
        running.start_worker(worker, {"worker_model": model})
    try:
        running.wait_ready(set(WORKERS.values()))
        yield running
    finally:
        running.stop()


async def test_openai_client_picks_each_model_and_its_workers_run_it(cluster):
    async with (httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as http,
                openai.AsyncOpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused") as api):
        listed = {model["id"]: model for model in (await http.get("/v1/models")).json()["data"]}
        images = {}
        for model, worker in WORKERS.items():
            raw = await api.images.with_raw_response.generate(
                model=model, prompt="a red square", size=f"{SIZE}x{SIZE}", response_format="b64_json",
                extra_body={"steps": STEPS, "seed": 5},
            )
            images[model] = _png_pixels(base64.b64decode(raw.parse().data[0].b64_json))
            state = (await http.get(f"/jobs/{raw.headers['x-job-id']}")).json()
            assert (state["model"], state["worker"]) == (model, worker), state
        with pytest.raises(openai.NotFoundError) as unknown:
            await api.images.generate(model="dall-e-3", prompt="a red square")
        await asyncio.sleep(STATS_INTERVAL_S + 0.1)  # the API refreshes its queue gauges this often
        api_metrics = (await http.get("/metrics")).text
    assert listed["tiny-dgq"]["default"] and not listed["tiny-fp"]["default"]
    assert listed["tiny-dgq"]["quantization"] == {"quant_method": "dgq", "bits": "W8A8", "prob_quantizer": "log2",
                                                  "exec_mode": "auto"}
    assert listed["tiny-fp"]["quantization"]["quant_method"] == "none"
    assert np.abs(images["tiny-dgq"] - images["tiny-fp"]).max() > 0
    message = str(unknown.value)
    assert "'dall-e-3' is not served here" in message and "'tiny-dgq'" in message and "'tiny-fp'" in message
    for model in WORKERS:
        assert f'dgq_live_workers{{model="{model}"}} 1.0' in api_metrics
        assert f'dgq_jobs_submitted_total{{mode="text",model="{model}"' in api_metrics
    with redis.Redis.from_url(cluster.redis_url) as client_redis:
        for model in WORKERS:
            assert client_redis.xlen(keys.jobs_stream(model)) == 0, "each model's stream acknowledged and emptied"


def test_a_worker_of_a_deployment_with_several_models_must_be_told_which(cluster):
    worker = subprocess.run([console_script("dgq-worker")], env=cluster.env, capture_output=True, text=True,
                            timeout=120)
    assert worker.returncode == 2 and "DGQ_WORKER_MODEL" in worker.stderr, worker.stderr


# --- the compose file's two-model setup, its services run as local processes ---


def _dotenv_with_the_two_model_example() -> dict[str, str]:
    """`.env.example` as `.env`, with its commented example of two models (DGQ_MODELS, DGQ_WORKER_MODEL,
    SECOND_WORKER_MODEL) turned on, as its comments tell a user to."""
    example = {"DGQ_MODELS", "DGQ_WORKER_MODEL", "SECOND_WORKER_MODEL"}
    values = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        uncommented = line.removeprefix("# ")
        name, equals, value = uncommented.partition("=")
        if equals and (not line.startswith("#") or name in example) and re.fullmatch(r"[A-Z_]+", name):
            values[name] = value
    assert example <= values.keys(), "the two-model example is in .env.example"
    return values


def _interpolated(value: str, dotenv: dict[str, str]) -> str:
    """Compose's `${NAME}` / `${NAME:-default}` interpolation from the `.env` values."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: dotenv.get(m[1]) or (m[2] or ""), value)


def test_the_compose_files_two_models_are_served_each_by_its_own_worker_service(redis_url, tmp_path):
    """docker-compose.yml's `api`, `worker` and `worker-second` services (the `second-model` profile), each started
    as its command with the environment compose would give it: `.env.example`'s two-model example as `.env`
    (env_file), then the service's `environment:` interpolated from it. Only what belongs to the host is replaced:
    Redis, ports, the CPU for the GPU, a cache directory. No container runtime here: this checks the compose
    file's settings, not Docker. The official openai client picks each model, and each is run by its service."""
    dotenv = _dotenv_with_the_two_model_example()
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert services["worker-second"]["profiles"] == ["second-model"]
    api_port = free_port()
    host = {"DGQ_REDIS_URL": redis_url, "DGQ_HOST": "127.0.0.1", "DGQ_PORT": str(api_port), "DGQ_DEVICE": "cpu",
            "DGQ_WORKER_METRICS_PORT": "0", "DGQ_QUANTIZED_CACHE_DIR": str(tmp_path / "cache"),
            "DGQ_TORCH_THREADS": "1"}
    processes, served_by = {}, {}
    try:
        for name in ("api", "worker", "worker-second"):
            service = services[name]
            environment = {key: _interpolated(str(value), dotenv) for key, value in service["environment"].items()}
            env = {**os.environ, **dotenv, **environment, **host, "DGQ_WORKER_ID": name}
            if name != "api":
                served_by[env["DGQ_WORKER_MODEL"]] = name
            (command,) = service["command"]
            processes[name] = spawn(command, env, tmp_path / f"{name}.log")
        assert set(served_by) == set(json.loads(dotenv["DGQ_MODELS"])), "one worker service per model"
        base_url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 240
        while True:
            for name, process in processes.items():
                assert process.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            try:
                ready = httpx.get(f"{base_url}/readyz").status_code == 200
            except httpx.TransportError:
                ready = False
            if ready:
                break
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-3000:]
            time.sleep(0.5)
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused") as api:
            for model in json.loads(dotenv["DGQ_MODELS"]):
                raw = api.images.with_raw_response.generate(
                    model=model, prompt="a red square", size="32x32", response_format="b64_json",
                    extra_body={"steps": 2, "seed": 5},
                )
                assert raw.parse().data[0].b64_json
                state = httpx.get(f"{base_url}/jobs/{raw.headers['x-job-id']}").json()
                assert (state["model"], state["worker"]) == (model, served_by[model]), state
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
