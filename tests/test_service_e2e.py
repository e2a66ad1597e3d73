"""End to end on a real redis-server: an API process and two worker processes (`dgq-serve` / `dgq-worker`
entry points), concurrent requests batched across requests, a worker killed with SIGKILL mid-job, a Redis
outage answered with 503 and survived without a restart, and two workers with default settings on one host."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import time

import httpx
import pytest
import redis
from conftest import free_port, running_api
from local_cluster import ServiceProcesses

from service.config import Settings
from service.queue import keys

pytestmark = pytest.mark.anyio

REQUEST = {"prompt": "a red square", "steps": 3, "seed": 11, "width": 16, "height": 16}


@pytest.fixture(scope="module")
def cluster(tiny_sd_model_dir, redis_server, tmp_path_factory):
    """An API process and two worker processes (each exporting /metrics on its own port) on one Redis."""
    redis_server.flush()
    running = ServiceProcesses(tiny_sd_model_dir, redis_server.url, tmp_path_factory.mktemp("cluster-logs"), {
        "batch_window_s": 0.5, "heartbeat_interval_s": 0.5, "worker_ttl_s": 3, "reaper_interval_s": 0.5,
        "max_batch": 4,
    })
    running.metrics_ports = {"worker-a": free_port(), "worker-b": free_port()}
    running.start_api()
    for name, port in running.metrics_ports.items():
        running.start_worker(name, {"worker_metrics_port": port})
    try:
        running.wait_ready(set(running.metrics_ports))
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
        assert f'dgq_live_workers{{model="{cluster.model}"}} 2.0' in api_metrics
        assert "dgq_text_encode_seconds_count" in api_metrics
        for port in cluster.metrics_ports.values():  # each worker exports its own metrics
            worker_metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "dgq_denoise_step_seconds_count" in worker_metrics
            assert f'dgq_model_weight_bytes{{component="unet",model="{cluster.model}",precision="float32"}}' \
                in worker_metrics


async def test_worker_killed_mid_job_job_completes_once_on_the_other(cluster):
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=300) as client:
        job_id = (await client.post("/generate", json=REQUEST | {"steps": 100, "width": 32, "height": 32,
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
            assert client_redis.xlen(keys.jobs_stream(cluster.model)) == 0, "acknowledged and removed"
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


def _metrics_port(log: str) -> int:
    [port] = re.findall(r"worker metrics on http://127\.0\.0\.1:(\d+)/metrics", log)
    return int(port)


def test_two_default_workers_on_one_host_serve_their_metrics_on_distinct_ports(tiny_sd_model_dir, redis_url,
                                                                               tmp_path):
    """Both with the default `worker_metrics_port` (9100): the second takes the next free port and says so; a port
    that cannot be bound for another reason stops the worker with one line naming the setting."""
    default_port = Settings.model_fields["worker_metrics_port"].default
    workers = ServiceProcesses(tiny_sd_model_dir, redis_url, tmp_path, {"worker_metrics_port": default_port})
    try:
        for name in ("first", "second"):
            workers.start_worker(name)
        elsewhere = workers.start_worker("elsewhere", {"host": "192.0.2.1"})  # TEST-NET-1: no address of this host
        deadline = time.monotonic() + 120
        while not all("worker metrics on" in workers.log_tail(name) for name in ("first", "second")):
            for name in ("first", "second"):
                assert workers.workers[name].poll() is None and time.monotonic() < deadline, workers.log_tail(name)
            time.sleep(0.1)
        ports = {name: _metrics_port(workers.log_tail(name)) for name in ("first", "second")}
        low, high = sorted(ports, key=ports.get)
        assert default_port <= ports[low] < ports[high], ports
        assert f"worker metrics port {default_port} is taken (worker_metrics_port): serving them on " \
               f"{ports[high]} instead" in workers.log_tail(high)
        for port in ports.values():
            assert "process_resident_memory_bytes" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert elsewhere.wait(timeout=60) == 2
        [line] = workers.log_tail("elsewhere").strip().splitlines()[-1:]
        assert line.startswith("dgq-worker: error: cannot serve the worker metrics on 192.0.2.1:9100 "
                               "(worker_metrics_port, host)") and "DGQ_WORKER_METRICS_PORT" in line
        assert "Traceback" not in workers.log_tail("elsewhere")
    finally:
        workers.stop(timeout_s=1)  # they may still be loading the model, which a drain would wait for
    print(f"\nFIGURE two default workers: metrics ports {ports}")
