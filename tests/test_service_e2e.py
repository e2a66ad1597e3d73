"""End to end on a real redis-server: an API process and two worker processes (`dgq serve` / `dgq worker`
entry points), concurrent requests batched across requests, a worker killed with SIGKILL mid-job, and a Redis
outage answered with 503 and survived without a restart."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import free_port, running_api

from service.config import Settings
from service.queue import keys

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUEST = {"prompt": "a red square", "steps": 3, "seed": 11, "width": 16, "height": 16}


def _spawn(entry_point: str, env: dict[str, str], log_file: Path) -> subprocess.Popen:
    code = f"import sys; from service.cli import {entry_point}; sys.exit({entry_point}([]))"
    with log_file.open("wb") as log:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


class Cluster:
    """An API process and two worker processes on one Redis."""

    def __init__(self, model_dir: Path, redis_url: str, log_dir: Path) -> None:
        self.api_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.redis_url = redis_url
        common = {
            **os.environ, "DGQ_MODEL": str(model_dir), "DGQ_QUANTIZED": "none", "REDIS_URL": redis_url,
            "DGQ_TORCH_THREADS": "1", "DGQ_WARMUP_STEPS": "1", "DGQ_BATCH_WINDOW_S": "0.5",
            "DGQ_HEARTBEAT_INTERVAL_S": "0.5", "DGQ_WORKER_TTL_S": "3", "DGQ_REAPER_INTERVAL_S": "0.5",
            "DGQ_MAX_BATCH": "4",
        }
        self.api = _spawn("serve_main", common | {"DGQ_PORT": str(self.api_port)}, log_dir / "api.log")
        self.metrics_ports = {"worker-a": free_port(), "worker-b": free_port()}
        self.workers = {
            name: _spawn("worker_main", common | {"DGQ_WORKER_ID": name, "DGQ_WORKER_METRICS_PORT": str(port)},
                         log_dir / f"{name}.log")
            for name, port in self.metrics_ports.items()
        }
        self.log_dir = log_dir

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with redis.Redis.from_url(self.redis_url) as client:
                    live = len(list(client.scan_iter(match=keys.WORKER_PATTERN)))
                if live == 2 and httpx.get(f"{self.base_url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.api.poll() is None, (self.log_dir / "api.log").read_text()
            time.sleep(0.2)
        raise AssertionError("cluster not ready: " + (self.log_dir / "worker-a.log").read_text()[-3000:])

    def stop(self) -> None:
        for process in [self.api, *self.workers.values()]:
            if process.poll() is None:
                process.terminate()
        for process in [self.api, *self.workers.values()]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def cluster(tiny_sd_model_dir, redis_server, tmp_path_factory):
    redis_server.flush()
    running = Cluster(tiny_sd_model_dir, redis_server.url, tmp_path_factory.mktemp("cluster-logs"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


async def test_two_workers_serve_concurrent_requests_with_batching(cluster):
    requests = [REQUEST | {"seed": seed, "prompt": prompt}
                for seed, prompt in enumerate(["a red square", "blue circle", "green", "star"] * 2)]
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=300) as client:
        accepted = await asyncio.gather(*(client.post("/generate", json=r | {"async": True}) for r in requests))
        job_ids = [response.json()["id"] for response in accepted]
        states = []
        for job_id in job_ids:
            while (state := (await client.get(f"/jobs/{job_id}")).json())["status"] in ("queued", "running"):
                await asyncio.sleep(0.1)
            states.append(state)
        assert [state["status"] for state in states] == ["succeeded"] * len(requests)
        assert max(state["timings"]["batch_images"] for state in states) > 1, "no request was batched"
        assert {state["worker"] for state in states} <= {"worker-a", "worker-b"}
        batched_pngs = [(await client.get(state["images"][0])).content for state in states]
        for request, batched_png in zip(requests[:4], batched_pngs[:4], strict=True):  # alone, one at a time
            assert (await client.post("/generate", json=request)).content == batched_png
        several = (await client.post("/generate", json=REQUEST | {"num_images": 2})).json()
        assert len(several["images"]) == 2 and base64.b64decode(several["images"][0]).startswith(b"\x89PNG")
        api_metrics = (await client.get("/metrics")).text
        assert "dgq_live_workers 2.0" in api_metrics and "dgq_text_encode_seconds_count" in api_metrics
        for port in cluster.metrics_ports.values():  # each worker exports its own metrics
            worker_metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "dgq_denoise_step_seconds_count" in worker_metrics
            assert 'dgq_model_weight_bytes{component="unet",precision="float32"}' in worker_metrics


async def test_worker_killed_mid_job_job_completes_once_on_the_other(cluster):
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=300) as client:
        job_id = (await client.post("/generate", json=REQUEST | {"steps": 60, "width": 48, "height": 48,
                                                                 "async": True})).json()["id"]
        with redis.Redis.from_url(cluster.redis_url) as client_redis:
            last, victim = "0-0", None
            while victim is None:  # the first denoising step tells us who runs it
                for _, entries in client_redis.xread({keys.job_events(job_id): last}, block=1000) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        if fields[b"event"] == b"step":
                            victim = client_redis.hget(keys.job(job_id), "worker").decode()
                            break
        cluster.workers[victim].send_signal(signal.SIGKILL)
        cluster.workers[victim].wait()
        deadline = time.monotonic() + 240
        while (state := (await client.get(f"/jobs/{job_id}")).json())["status"] != "succeeded":
            assert state["status"] in ("queued", "running") and time.monotonic() < deadline, state
            await asyncio.sleep(0.2)
        survivor = ({"worker-a", "worker-b"} - {victim}).pop()
        assert state["worker"] == survivor and state["deliveries"] == 2
        with redis.Redis.from_url(cluster.redis_url) as client_redis:
            assert client_redis.hget(keys.job(job_id), "completions") == b"1"
            events = [fields[b"event"] for _, fields in client_redis.xrange(keys.job_events(job_id))]
            assert events.count(b"succeeded") == 1 and events.count(b"started") == 2
            assert client_redis.xlen(keys.JOBS_STREAM) == 0, "acknowledged and removed"
        assert (await client.get(state["images"][0])).status_code == 200


async def test_redis_outage_is_503_and_service_recovers_without_restart(tiny_sd_model_dir, redis_server, redis_url):
    settings = Settings(model=str(tiny_sd_model_dir), quantized="none", redis_url=redis_url, embedded_worker=True,
                        warmup_steps=1, retry_after_s=1)
    async with running_api(settings) as client:
        assert (await client.post("/generate", json=REQUEST)).status_code == 200
        redis_server.stop()
        try:
            down = await client.post("/generate", json=REQUEST)
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            assert "Redis" in down.json()["detail"]
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
        finally:
            redis_server.start()
        deadline = time.monotonic() + 60
        while (response := await client.post("/generate", json=REQUEST)).status_code != 200:
            assert time.monotonic() < deadline, response.text
            await asyncio.sleep(0.5)
        assert response.headers["content-type"] == "image/png"
