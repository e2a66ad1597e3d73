"""Faults, each survived with nothing lost and each reported with a figure (printed; `pytest -s` shows them,
RELIABILITY.md quotes them).

Real parts throughout: a redis-server with the append-only file on, `dgq-serve` and two `dgq-worker` child
processes on the tiny random model (kill -9 a worker mid-batch, kill -9 Redis, kill -9 the API, SIGTERM a worker);
and an in-process `Worker` on another real Redis for the failures inside a batch (out of memory, a job that fails
every time, malformed entries written straight into the stream). The out-of-memory error comes from a forward
pre-hook on the UNet, i.e. from inside the pipeline call, whenever the UNet is given more rows than a cap: the hook
asks torch's CPU allocator for 1 EiB, more than any address space holds, and the allocator's own refusal is what
the worker handles; only when it happens is chosen by the test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import torch
from conftest import running_api
from local_cluster import RedisServer, ServiceProcesses
from safetensors.torch import save as save_safetensors

from dgq_core import EncodedPrompt, pack_prompt_pair
from service.config import Settings
from service.queue import keys, make_queue
from service.schemas import JobSpec
from service.served_model import ServedModel
from service.worker import Worker

pytestmark = pytest.mark.anyio

SIZE, STEPS = 16, 40
"""Small images; enough steps that a batch of 4 runs ~1-2 s on one CPU thread, long enough to hit mid-batch."""
REQUEST = {"prompt": "a red square", "steps": STEPS, "width": SIZE, "height": SIZE, "async": True}
CLUSTER_SETTINGS = {
    "max_batch": 4, "batch_window_s": 0.3, "heartbeat_interval_s": 0.3, "worker_ttl_s": 1.5,
    "reaper_interval_s": 0.3, "retry_after_s": 1, "queue_max": 32, "result_ttl_s": 300,
}
WORKERS = {"worker-a", "worker-b"}
ENDED = ("succeeded", "failed", "cancelled")


def figure(test: str, text: str) -> None:
    print(f"\nFIGURE {test}: {text}")


@pytest.fixture(scope="module")
def cluster(tiny_sd_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An AOF-persisted Redis, `dgq-serve` and two workers, shared by the process-level fault tests (in order)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True)
    redis_server.start()
    processes = ServiceProcesses(tiny_sd_model_dir, redis_server.url, tmp_path_factory.mktemp("fault-logs"),
                                 CLUSTER_SETTINGS)
    processes.redis_server = redis_server
    processes.start_api()
    for name in sorted(WORKERS):
        processes.start_worker(name)
    try:
        processes.wait_ready(WORKERS)
        yield processes
    finally:
        processes.stop()
        redis_server.stop()


def _redis(cluster: ServiceProcesses) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis_url)


async def _submit(client: httpx.AsyncClient, count: int, first_seed: int) -> list[str]:
    responses = await asyncio.gather(
        *(client.post("/generate", json=REQUEST | {"seed": first_seed + n}) for n in range(count))
    )
    assert [response.status_code for response in responses] == [202] * count, responses[0].text
    return [response.json()["id"] for response in responses]


async def _wait_ended(client: httpx.AsyncClient, job_ids: list[str], timeout_s: float = 90) -> list[dict]:
    """Poll GET /jobs/{id} until every job ended, riding out 503s and a missing API (restarts)."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, dict] = {}
    while len(states) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs still not ended: {set(job_ids) - set(states)}"
        for job_id in set(job_ids) - set(states):
            try:
                response = await client.get(f"/jobs/{job_id}")
            except httpx.TransportError:
                break
            if response.status_code == 200 and response.json()["status"] in ENDED:
                states[job_id] = response.json()
        await asyncio.sleep(0.2)
    return [states[job_id] for job_id in job_ids]


def _wait_step(client_redis: redis.Redis, job_id: str) -> str:
    """Block until the job's first denoising step; the worker running it."""
    last = "0-0"
    while True:
        for _, entries in client_redis.xread({keys.job_events(job_id): last}, block=10_000) or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields[b"event"] == b"step":
                    return client_redis.hget(keys.job(job_id), "worker").decode()


def _assert_each_result_once(client_redis: redis.Redis, model: str, job_ids: list[str]) -> None:
    """One success transition, one terminal event and one image key per job; nothing left in the stream."""
    for job_id in job_ids:
        assert client_redis.hget(keys.job(job_id), "completions") == b"1", job_id
        events = [fields[b"event"] for _, fields in client_redis.xrange(keys.job_events(job_id))]
        assert events.count(b"succeeded") == 1 and not {b"failed", b"cancelled"} & set(events), events
        assert client_redis.exists(keys.job_image(job_id, 0)) and not client_redis.exists(keys.job_image(job_id, 1))
    assert client_redis.xlen(keys.jobs_stream(model)) == 0, "every entry acknowledged and deleted"


# --- process faults (in this order on one cluster) ---


async def test_worker_killed_mid_batch_its_jobs_finish_once_on_the_other(cluster):
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        with _redis(cluster) as client_redis:
            job_ids = await _submit(client, 8, first_seed=100)  # a batch of 4 for each worker
            victim = _wait_step(client_redis, job_ids[0])
            batch = [job_id for job_id in job_ids if client_redis.hget(keys.job(job_id), "worker") == victim.encode()
                     and client_redis.hget(keys.job(job_id), "status") == b"running"]
            cluster.workers[victim].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            cluster.workers[victim].wait()
            states = await _wait_ended(client, job_ids)
            recovered_s = time.monotonic() - killed_at
            survivor = (WORKERS - {victim}).pop()
            assert [state["status"] for state in states] == ["succeeded"] * 8
            for state in states:
                if state["id"] in batch:
                    assert state["worker"] == survivor and state["deliveries"] == 2, state
            _assert_each_result_once(client_redis, cluster.model, job_ids)
    cluster.start_worker(victim)  # back to two workers for the next tests (they wait for it)
    figure("kill -9 worker", f"{len(batch)} jobs of the killed batch reclaimed and finished on {survivor}; "
           f"8/8 succeeded, each with exactly 1 result; {recovered_s:.1f} s from kill to the last result "
           f"(worker_ttl_s={CLUSTER_SETTINGS['worker_ttl_s']})")
    assert len(batch) >= 1


async def test_redis_killed_with_aof_queued_jobs_survive_and_api_answers_503_meanwhile(cluster):
    api_pid = cluster.api.pid
    held = len(WORKERS) * CLUSTER_SETTINGS["max_batch"]
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        job_ids = await _submit(client, 2 * held, first_seed=200)  # more than the workers can hold: some queued
        with _redis(cluster) as client_redis:
            queued_at_kill = sum(client_redis.hget(keys.job(i), "status") == b"queued" for i in job_ids)
        assert queued_at_kill >= held
        cluster.redis_server.kill()
        down_at = time.monotonic()
        try:
            down_post = await client.post("/generate", json=REQUEST)
            down_get = await client.get(f"/jobs/{job_ids[0]}")
            for response in (down_post, down_get):
                assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
                assert "Redis" in response.json()["detail"]
            await asyncio.sleep(1.0)  # a while down: workers keep polling through the outage
        finally:
            cluster.redis_server.start()
        restarted_at = time.monotonic()
        while (response := await client.post("/generate", json=REQUEST | {"seed": 299})).status_code != 202:
            assert response.status_code == 503 and time.monotonic() - restarted_at < 30, response.text
            await asyncio.sleep(0.2)
        answered_after_s = time.monotonic() - restarted_at
        job_ids.append(response.json()["id"])
        states = await _wait_ended(client, job_ids)
        assert [state["status"] for state in states] == ["succeeded"] * len(job_ids)
        with _redis(cluster) as client_redis:
            _assert_each_result_once(client_redis, cluster.model, job_ids)
    assert cluster.api.poll() is None and cluster.api.pid == api_pid, "the API was not restarted"
    figure("kill -9 Redis (AOF, appendfsync always)",
           f"{queued_at_kill}/{2 * held} jobs queued at the kill; down {restarted_at - down_at:.1f} s, POST and GET "
           f"answered 503 + Retry-After: 1; API accepting again {answered_after_s:.1f} s after Redis was back, without "
           "restart; "
           f"{len(job_ids)}/{len(job_ids)} jobs succeeded once each")


async def test_api_restarted_while_jobs_queued_async_clients_get_results(cluster):
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        job_ids = await _submit(client, 8, first_seed=300)
        cluster.api.send_signal(signal.SIGKILL)
        cluster.api.wait()
        killed_at = time.monotonic()
        cluster.start_api()
        states = await _wait_ended(client, job_ids, timeout_s=180)  # polls through the restart
        back_s = time.monotonic() - killed_at
        assert [state["status"] for state in states] == ["succeeded"] * 8
        pngs = [await client.get(state["images"][0]) for state in states]
        assert all(png.status_code == 200 and png.content.startswith(b"\x89PNG") for png in pngs)
        with _redis(cluster) as client_redis:
            _assert_each_result_once(client_redis, cluster.model, job_ids)
    figure("kill -9 API", f"8/8 async jobs' results fetched from the restarted API ({back_s:.1f} s after the kill)")


async def test_sigterm_worker_finishes_what_it_holds_takes_nothing_new_and_exits_0(cluster):
    cluster.wait_ready(WORKERS)  # the worker killed in the first test is back
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        with _redis(cluster) as client_redis:
            job_ids = await _submit(client, 8, first_seed=400)
            victim = _wait_step(client_redis, job_ids[0])
            cluster.workers[victim].send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            later_ids = await _submit(client, 4, first_seed=500)
            exit_code = await asyncio.to_thread(cluster.workers[victim].wait, 60)
            drain_s = time.monotonic() - signalled_at
            states = await _wait_ended(client, job_ids + later_ids)
            assert exit_code == 0, cluster.log_tail(victim)
            assert "worker drained and stopped" in cluster.log_tail(victim)
            assert [state["status"] for state in states] == ["succeeded"] * 12
            finished_by_victim = [state for state in states if state["worker"] == victim]
            assert finished_by_victim and all(state["deliveries"] == 1 for state in finished_by_victim)
            assert all(state["worker"] != victim for state in states[8:]), "took a job after SIGTERM"
            consumers = {c["name"]: c["pending"] for c in client_redis.xinfo_consumers(
                keys.jobs_stream(cluster.model), keys.WORKER_GROUP)}
            assert consumers.get(victim.encode(), 0) == 0, "left entries unacknowledged"
            _assert_each_result_once(client_redis, cluster.model, job_ids + later_ids)
    figure("SIGTERM worker", f"exit code 0 after a {drain_s:.1f} s drain; it finished {len(finished_by_victim)} "
           "held jobs (each delivered once), took none of the 4 submitted after the signal; 12/12 succeeded")


# --- failures inside a batch (in-process worker on its own Redis) ---


class UNetMemoryCap:
    """Fails an allocation inside the UNet's forward when it is given more than `max_rows` rows: torch's CPU
    allocator refuses 1 EiB (a RuntimeError "DefaultCPUAllocator: can't allocate memory: you tried to allocate
    ..."), as it refuses any allocation the system cannot back."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.max_rows: int | None = None
        self.refused: list[int] = []
        unet.register_forward_pre_hook(self._check)

    def _check(self, module: torch.nn.Module, args: tuple) -> None:
        rows = args[0].shape[0]
        if self.max_rows is not None and rows > self.max_rows:
            self.refused.append(rows)
            torch.empty(1 << 60, dtype=torch.uint8)


@pytest.fixture(scope="module")
def worker_pipe(tiny_sd_model_dir: Path):
    """The worker pipeline, loaded once, with a switchable UNet memory cap."""
    pipe = ServedModel(Settings(model=str(tiny_sd_model_dir), quantized="none")).load_worker_pipeline()
    pipe.memory_cap = UNetMemoryCap(pipe.unet)
    yield pipe
    pipe.memory_cap.max_rows = None


@dataclass
class InProcess:
    client: httpx.AsyncClient
    """Talks to an API (without a worker of its own) over ASGI."""
    worker_task: asyncio.Task
    client_redis: redis.Redis
    memory_cap: UNetMemoryCap
    model: str
    """The served model's name (its job stream)."""


@pytest.fixture
async def in_process(tiny_sd_model_dir: Path, redis_url: str, worker_pipe) -> AsyncIterator[InProcess]:
    """An API and one in-process worker on `worker_pipe`; a batch window long enough that jobs submitted
    together are taken together."""
    settings = Settings(model=str(tiny_sd_model_dir), quantized="none", redis_url=redis_url, embedded_worker=False,
                        warmup_steps=1, max_batch=4, batch_window_s=1.0, heartbeat_interval_s=0.3, worker_ttl_s=5)
    queue = make_queue(settings)
    worker = Worker(settings.model_copy(update={"worker_id": "in-process"}), queue, pipe=worker_pipe)
    task = asyncio.create_task(worker.run())
    try:
        async with running_api(settings) as client:
            with redis.Redis.from_url(redis_url) as client_redis:
                yield InProcess(client, task, client_redis, worker_pipe.memory_cap, settings.default_model)
    finally:
        worker_pipe.memory_cap.max_rows = None
        worker.stop()
        await asyncio.wait_for(task, 30)
        await queue.close()


def _dead_letters(client_redis: redis.Redis) -> dict[str, str]:
    return {fields[b"job"].decode(): fields[b"reason"].decode()
            for _, fields in client_redis.xrange(keys.DEAD_LETTER_STREAM)}


async def test_out_of_memory_batch_is_split_and_retried_and_a_job_too_big_alone_fails_cleanly(in_process):
    client, client_redis, memory_cap = in_process.client, in_process.client_redis, in_process.memory_cap
    memory_cap.max_rows = 2  # one image with guidance (negative + positive row); two images do not fit
    singles = await _submit(client, 3, first_seed=1)
    [pair] = [(await client.post("/generate", json=REQUEST | {"seed": 9, "num_images": 2})).json()["id"]]
    states = await _wait_ended(client, [*singles, pair])
    assert [state["status"] for state in states[:3]] == ["succeeded"] * 3
    assert all(state["timings"]["batch_images"] == 1 for state in states[:3]), "retried alone after the split"
    assert states[3]["status"] == "failed" and states[3]["error"].startswith("out of memory running this job alone")
    assert "fewer images or a smaller size" in states[3]["error"] and states[3]["error_type"] == "InsufficientMemory"
    assert "allocate" not in states[3]["error"], "the allocator's text stays in the worker's log"
    assert _dead_letters(client_redis) == {pair: states[3]["error"]}
    synchronous = await client.post("/generate", json=REQUEST | {"seed": 9, "num_images": 2, "async": False})
    assert synchronous.status_code == 422 and synchronous.json()["type"] == "InsufficientMemory"
    assert "out of memory running this job alone" in synchronous.json()["detail"]
    memory_cap.max_rows = None
    [after] = await _submit(client, 1, first_seed=20)
    assert (await _wait_ended(client, [after]))[0]["status"] == "succeeded" and not in_process.worker_task.done()
    figure("out of memory", f"UNet calls refused at {sorted(set(memory_cap.refused))} rows; 3/3 single-image jobs "
           "succeeded after splitting (batch 3 -> 1 + 2 -> 1 + 1), the 2-image job failed alone with "
           f"\"{states[3]['error']}\" and went to the dead letters, the same request made synchronously got "
           f"{synchronous.status_code} {synchronous.json()['type']}; the worker kept serving")


async def test_job_failing_every_time_is_dead_lettered_and_its_batch_mates_succeed(in_process, redis_url):
    client, client_redis = in_process.client, in_process.client_redis
    queue = make_queue(Settings(redis_url=redis_url))
    # front stage of a model with another text-encoder width (an API on a different model than the workers):
    # the UNet cannot take these embeddings, however often or with whatever company the job is run
    wrong_width = EncodedPrompt(torch.zeros(77, 48), None, {})
    poison = JobSpec(id="poison", model=in_process.model, width=SIZE, height=SIZE, steps=STEPS, guidance_scale=7.5, seed=1, num_images=1,
                     scheduler="model-default")
    await queue.submit(poison, pack_prompt_pair(wrong_width, wrong_width), {})
    good = await _submit(client, 2, first_seed=30)
    states = await _wait_ended(client, ["poison", *good])
    await queue.close()
    assert states[0]["status"] == "failed" and states[0]["error"].startswith("generation failed: RuntimeError")
    assert [state["status"] for state in states[1:]] == ["succeeded"] * 2
    assert _dead_letters(client_redis) == {"poison": states[0]["error"]}
    [after] = await _submit(client, 1, first_seed=40)
    assert (await _wait_ended(client, [after]))[0]["status"] == "succeeded" and not in_process.worker_task.done()
    figure("job failing every time", f"failed with \"{states[0]['error'][:80]}...\", in the dead-letter stream; "
           "its 2 batch mates and the next job succeeded")


def _spec_json(job_id: str, model: str, **changes: object) -> str:
    spec = JobSpec(id=job_id, model=model, width=SIZE, height=SIZE, steps=2, guidance_scale=7.5, seed=1, num_images=1,
                   scheduler="model-default")
    return json.dumps(spec.model_dump() | changes)


async def test_malformed_job_entries_in_redis_are_dead_lettered_and_the_worker_keeps_serving(in_process):
    client, client_redis, model = in_process.client, in_process.client_redis, in_process.model
    stream = keys.jobs_stream(model)
    tensors_without_negative = save_safetensors({"prompt_embeds": torch.zeros(77, 32)})
    bad_jobs = {  # job id -> hash fields as something other than `submit` might write them
        "wrong-types": {"spec": _spec_json("wrong-types", model, width="wide", steps=[2]), "payload": b"x"},
        "not-json": {"spec": "{not json", "payload": b"x"},
        "no-payload": {"spec": _spec_json("no-payload", model)},
        "bad-safetensors": {"spec": _spec_json("bad-safetensors", model), "payload": b"\x00\x01 not safetensors"},
        "missing-tensor": {"spec": _spec_json("missing-tensor", model), "payload": tensors_without_negative},
        # well formed, but beyond the model's limits, which only the API checked before
        "beyond-limits": {"spec": _spec_json("beyond-limits", model, width=4096, height=4096, steps=10_000),
                          "payload": pack_prompt_pair(*[EncodedPrompt(torch.zeros(77, 32), None, {})] * 2)},
    }
    for job_id, fields in bad_jobs.items():
        client_redis.hset(keys.job(job_id), mapping=fields | {"status": "queued"})
        client_redis.xadd(stream, {"job": job_id})
    client_redis.xadd(stream, {"no-job-field": "1"})
    client_redis.xadd(stream, {"job": b"\xff\xfe"})
    [good] = await _submit(client, 1, first_seed=50)
    [state] = await _wait_ended(client, [good])
    assert state["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while client_redis.xlen(keys.DEAD_LETTER_STREAM) < len(bad_jobs) + 2:
        assert time.monotonic() < deadline, _dead_letters(client_redis)
        await asyncio.sleep(0.1)
    dead = _dead_letters(client_redis)
    assert set(dead) == set(bad_jobs) | {""}
    for job_id in bad_jobs:
        status, error = client_redis.hmget(keys.job(job_id), ["status", "error"])
        assert status == b"failed" and error.decode() == dead[job_id], (job_id, error)
    reasons = {job_id: dead[job_id] for job_id in bad_jobs}
    assert "malformed job" in reasons["wrong-types"] and "malformed job" in reasons["not-json"]
    assert "no payload" in reasons["no-payload"]
    assert "SafetensorError" in reasons["bad-safetensors"] and "negative_prompt_embeds" in reasons["missing-tensor"]
    assert reasons["beyond-limits"].startswith("width 4096 is above the limit 48 of model")
    assert "steps 10000 is above the limit 100" in reasons["beyond-limits"]
    assert client_redis.hget(keys.job("beyond-limits"), "error_type") == b"InvalidRequest"
    assert client_redis.xlen(stream) == 0 and not in_process.worker_task.done()
    figure("malformed entries", f"{len(bad_jobs) + 2} malformed entries written straight into the stream "
           "(wrong types, not JSON, no payload, bad safetensors, a missing tensor, a job beyond the model's limits, no "
           "job id, a non-UTF-8 id): all "
           "dead-lettered with a reason, the jobs among them failed with it; the worker kept serving")
