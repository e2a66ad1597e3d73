"""The JobQueue contract, run against both backends; Redis-only: heartbeats, reaper, dead letters, outage."""

from __future__ import annotations

import asyncio

import pytest
import redis
from prometheus_client import REGISTRY

from dgq_core import ScoresFootprint
from service.config import Settings
from service.errors import QueueFull, QueueUnavailable
from service.memory import MemoryProfile
from service.queue import keys, make_queue
from service.queue.base import QueuedJob, StoredImages
from service.schemas import JobEvent, JobSpec, JobStatus

pytestmark = pytest.mark.anyio


MODEL = "shapes"


def _spec(job_id: str, model: str = MODEL) -> JobSpec:
    return JobSpec(id=job_id, model=model, width=16, height=16, steps=2, guidance_scale=7.5, seed=1, num_images=2,
                   scheduler="model-default")


@pytest.fixture(params=["memory", "redis"])
def queue_settings(request) -> Settings:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Settings(redis_url=redis_url, queue_max=3, result_ttl_s=60, worker_ttl_s=0.5, heartbeat_interval_s=0.25,
                    max_deliveries=2)


@pytest.fixture
async def queue(queue_settings):
    job_queue = make_queue(queue_settings)
    yield job_queue
    await job_queue.close()


async def test_job_lifecycle_and_positions(queue):
    for job_id in ("a", "b", "c"):
        await queue.submit(_spec(job_id), b"payload-" + job_id.encode(), {"text_encode_s": 0.1})
    assert [(await queue.get(i)).position for i in "abc"] == [0, 1, 2]
    with pytest.raises(QueueFull) as full:
        await queue.submit(_spec("d"), b"", {})
    assert full.value.retry_after_s >= 1

    taken = await queue.take("w1", MODEL, max_jobs=2, window_s=0.01)
    assert [job.spec.id for job in taken] == ["a", "b"] and taken[0].payload == b"payload-a"
    assert (await queue.get("c")).position == 0
    assert await queue.start(taken[0], "w1")
    await queue.publish("a", JobEvent(event="step", data={"step": 1}))
    await queue.succeed(taken[0], StoredImages(pngs=[b"png0", b"png1"], timings={"denoise_s": 1.0}))
    await queue.succeed(taken[0], StoredImages(pngs=[b"other", b"other"]))  # a second finish changes nothing
    state = await queue.get("a")
    assert state.status == JobStatus.succeeded and state.images == ["/jobs/a/images/0", "/jobs/a/images/1"]
    assert state.timings == {"text_encode_s": 0.1, "denoise_s": 1.0} and state.worker == "w1"
    assert [await queue.image("a", n) for n in (0, 1)] == [b"png0", b"png1"]
    assert [event.event async for event in queue.events("a")] == ["queued", "started", "step", "succeeded"]

    assert await queue.start(taken[1], "w1")
    await queue.fail(taken[1], "out of memory", {}, error_type="InsufficientMemory")
    state = await queue.get("b")
    assert state.status == JobStatus.failed and state.error == "out of memory"
    assert state.error_type == "InsufficientMemory", "a synchronous request answers with this type"
    assert (await queue.stats(MODEL)).depth == 1


def _jobs_cancelled() -> float:
    return REGISTRY.get_sample_value("dgq_jobs_total", {"model": MODEL, "outcome": "cancelled"}) or 0.0


async def test_cancel_queued_and_running(queue):
    await queue.submit(_spec("q"), b"x", {})
    await queue.submit(_spec("r"), b"x", {})
    cancelled_before = _jobs_cancelled()
    assert (await queue.cancel("q")).status == JobStatus.cancelled
    assert (await queue.cancel("q")).status == JobStatus.cancelled  # idempotent
    assert _jobs_cancelled() - cancelled_before == 1, "a job cancelled while queued counts once among the outcomes"
    taken = await queue.take("w1", MODEL, max_jobs=4, window_s=0)
    started = [job for job in taken if await queue.start(job, "w1")]
    assert [job.spec.id for job in started] == ["r"]
    assert (await queue.cancel("r")).status == JobStatus.running
    assert await queue.cancel_requested(["r"]) == {"r"}
    await queue.finish_cancelled(started[0])
    assert (await queue.get("r")).status == JobStatus.cancelled
    assert (await queue.stats(MODEL)).depth == 0
    assert await queue.get("unknown") is None


async def test_each_model_has_its_own_queue_bound_and_workers(queue):
    for job_id, model in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("a3", "a")):
        await queue.submit(_spec(job_id, model), b"x", {})
    with pytest.raises(QueueFull):
        await queue.submit(_spec("a4", "a"), b"x", {})
    await queue.submit(_spec("b2", "b"), b"x", {})  # model a's queue is full, model b's is not
    assert [(await queue.get(i)).position for i in ("a1", "a2", "b1", "b2")] == [0, 1, 0, 1]
    assert (await queue.get("b1")).model == "b"
    taken = await queue.take("worker-of-b", "b", max_jobs=4, window_s=0)
    assert [job.spec.id for job in taken] == ["b1", "b2"] and {job.model for job in taken} == {"b"}
    for job in taken:
        assert await queue.start(job, "worker-of-b")
        await queue.succeed(job, StoredImages(pngs=[b"p", b"p"]))
    stats_a, stats_b = await queue.stats("a"), await queue.stats("b")
    assert (stats_a.depth, stats_a.lag, stats_b.depth, stats_b.lag) == (3, 3, 0, 0)
    await queue.publish_memory_profile("b", _memory_profile("worker-of-b"))
    assert await queue.memory_profiles("a") == [] and len(await queue.memory_profiles("b")) == 1
    assert (await queue.stats("b")).live_workers == 1 and (await queue.stats("a")).live_workers == 0


async def test_cancel_after_take_before_start(queue):
    await queue.submit(_spec("t"), b"x", {})
    [job] = await queue.take("w1", MODEL, max_jobs=1, window_s=0)
    assert (await queue.cancel("t")).status == JobStatus.cancelled
    assert not await queue.start(job, "w1"), "the worker skips it"
    assert (await queue.stats(MODEL)).depth == 0


@pytest.fixture
def redis_settings(redis_url) -> Settings:
    return Settings(redis_url=redis_url, worker_ttl_s=0.5, heartbeat_interval_s=0.25, max_deliveries=2, max_batch=4)


async def test_heartbeat_keeps_jobs_and_reaper_takes_dead_workers_jobs(redis_settings):
    queue = make_queue(redis_settings)
    await queue.submit(_spec("long"), b"x", {})
    await queue.submit(_spec("orphan"), b"x", {})
    [long_job] = await queue.take("alive", MODEL, max_jobs=1, window_s=0)
    [orphan] = await queue.take("dead", MODEL, max_jobs=1, window_s=0)
    for job, worker in ((long_job, "alive"), (orphan, "dead")):
        assert await queue.start(job, worker)
    for _ in range(4):  # 'alive' heartbeats past the worker TTL, 'dead' never does
        await queue.heartbeat("alive", MODEL, [long_job])
        await asyncio.sleep(0.25)
    assert (await queue.stats(MODEL)).live_workers == 1
    reclaimed = await queue.reap("rescuer", MODEL)
    assert [job.spec.id for job in reclaimed] == ["orphan"] and reclaimed[0].deliveries == 2
    assert await queue.start(reclaimed[0], "rescuer")
    await queue.succeed(reclaimed[0], StoredImages(pngs=[b"a", b"b"]))
    state = await queue.get("orphan")
    assert state.status == JobStatus.succeeded and state.worker == "rescuer" and state.deliveries == 2
    await queue.close()


def _memory_profile(worker_id: str) -> MemoryProfile:
    return MemoryProfile(
        worker_id=worker_id, device="cpu", held_bytes=1 << 29, budget_bytes=1 << 30, budget_source="test",
        vae_scale_factor=8, scores=ScoresFootprint(heads=8, downscale=1, budget_bytes=1 << 28),
        denoise=(1e7, 3000.0, 1.0), decode=(1e7, 2000.0),
    )


async def test_memory_profiles_of_live_workers_only_and_the_reaper_removes_the_dead(redis_settings, redis_url):
    queue = make_queue(redis_settings)
    for worker_id in ("alive", "dead"):
        await queue.publish_memory_profile(MODEL, _memory_profile(worker_id))
    assert sorted(profile.worker_id for profile in await queue.memory_profiles(MODEL)) == ["alive", "dead"]
    assert (await queue.memory_profiles(MODEL))[0] == _memory_profile((await queue.memory_profiles(MODEL))[0].worker_id)
    for _ in range(3):  # 'alive' publishes with its heartbeats past the worker TTL, 'dead' never again
        await queue.publish_memory_profile(MODEL, _memory_profile("alive"))
        await asyncio.sleep(0.25)
    assert [profile.worker_id for profile in await queue.memory_profiles(MODEL)] == ["alive"]
    with redis.Redis.from_url(redis_url) as client:
        assert client.hexists(keys.worker_memory(MODEL), "dead"), "ignored, not yet removed"
        await queue.reap("alive", MODEL)
        assert client.hkeys(keys.worker_memory(MODEL)) == [b"alive"]
    await queue.close()


async def test_dead_letter_after_max_deliveries(redis_settings, redis_url):
    queue = make_queue(redis_settings)
    await queue.submit(_spec("cursed"), b"x", {})
    [job] = await queue.take("w0", MODEL, max_jobs=1, window_s=0)
    await queue.start(job, "w0")
    for rescuer in ("w1", "w2"):  # every worker that takes it dies
        await asyncio.sleep(0.6)
        reclaimed = await queue.reap(rescuer, MODEL)
        if rescuer == "w1":
            assert [j.spec.id for j in reclaimed] == ["cursed"]
    assert reclaimed == []
    state = await queue.get("cursed")
    assert state.status == JobStatus.failed and "deliveries" in state.error
    with redis.Redis.from_url(redis_url) as client:
        [(_, fields)] = client.xrange(keys.DEAD_LETTER_STREAM)
        assert fields[b"job"] == b"cursed"
        assert client.xlen(keys.jobs_stream(MODEL)) == 0
    await queue.close()


async def test_redis_outage_raises_unavailable_then_recovers(redis_server, redis_url):
    queue = make_queue(Settings(redis_url=redis_url))
    await queue.ping()
    redis_server.stop()
    try:
        with pytest.raises(QueueUnavailable) as unavailable:
            await queue.submit(_spec("x"), b"x", {})
        assert unavailable.value.retry_after_s >= 1
    finally:
        redis_server.start()
    await queue.submit(_spec("x"), b"x", {})  # same client, no restart
    [job] = await queue.take("w", MODEL, max_jobs=1, window_s=0)
    assert isinstance(job, QueuedJob) and job.spec.id == "x"
    await queue.close()
