"""The load scenario of bench/bench_load.py, small and fast: the API and two worker processes on a real Redis,
driven at twice the queue bound; every answer is 200/202 or 429 with Retry-After, no job is lost, memory stays
bounded, the queue never holds more than its bound. And the bound itself under a burst of concurrent submits."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_load import LoadConfig, run_load  # noqa: E402
from service.config import Settings  # noqa: E402
from service.errors import QueueFull  # noqa: E402
from service.queue import keys, make_queue  # noqa: E402
from service.schemas import JobSpec  # noqa: E402


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_load_at_twice_the_queue_bound_loses_nothing(tiny_sd_model_dir, tmp_path):
    config = LoadConfig(queue_max=4, duration_s=15, max_requests=200, steps=2, drain_timeout_s=60, edit_share=0.3,
                        stream_share=0.2)
    results = run_load(tiny_sd_model_dir, tmp_path, config)
    print(f"\nFIGURE load: {results}")
    assert results["bad_answers"] == 0, results["bad_examples"]
    assert results["jobs_lost"] == 0 and results["jobs_accepted"] > 0, results["job_outcomes"]
    assert set(results["job_outcomes"]) == {"succeeded"}
    assert results["answers"].get("429", 0) > 0, "the load did not reach the queue bound"
    # every kind of request (text, edits through both routes, OpenAI streams) was served as well as refused
    assert all(answers.get("200", 0) + answers.get("202", 0) > 0 for answers in results["answers_by_kind"].values())
    assert set(results["answers_by_kind"]) == {"sync", "async", "edit", "openai-edit", "stream"}
    assert results["queue_depth_peak"] <= config.queue_max
    for name, memory in results["memory"].items():  # a short run: growth well below what a leak per request makes
        limit_mib = 64 if name == "redis_used_memory" else 200
        assert memory["peak_mib"] - memory["start_mib"] < limit_mib, (name, memory)


@pytest.mark.anyio
async def test_a_burst_of_concurrent_submits_is_held_to_the_queue_bound(redis_url):
    """Submits racing at an empty queue: exactly `queue_max` get in, the others are refused and leave nothing."""
    queue = make_queue(Settings(redis_url=redis_url, queue_max=4, _env_file=None))
    specs = [JobSpec(id=f"burst-{n}", model="m", width=16, height=16, steps=2, guidance_scale=7.5, seed=n, num_images=1,
                     scheduler="model-default") for n in range(32)]
    try:
        results = await asyncio.gather(*(queue.submit(spec, b"payload", {}) for spec in specs), return_exceptions=True)
    finally:
        await queue.close()
    refused = [spec.id for spec, result in zip(specs, results, strict=True) if isinstance(result, QueueFull)]
    assert len(refused) == 28 and sum(not isinstance(result, BaseException) for result in results) == 4, results
    with redis.Redis.from_url(redis_url) as client:
        assert client.xlen(keys.jobs_stream("m")) == 4
        assert not any(client.exists(keys.job(job_id), keys.job_events(job_id)) for job_id in refused)
