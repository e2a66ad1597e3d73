"""The load scenario of bench/bench_load.py, small and fast: the API and two worker processes on a real Redis,
driven at twice the queue bound; every answer is 200/202 or 429 with Retry-After, no job is lost, memory stays
bounded."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_load import LoadConfig, run_load  # noqa: E402

MIB = 2**20


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_load_at_twice_the_queue_bound_loses_nothing(tiny_sd_model_dir, tmp_path):
    config = LoadConfig(queue_max=4, duration_s=15, max_requests=200, steps=2, drain_timeout_s=60)
    results = run_load(tiny_sd_model_dir, tmp_path, config)
    print(f"\nFIGURE load: {results}")
    assert results["bad_answers"] == 0, results["bad_examples"]
    assert results["jobs_lost"] == 0 and results["jobs_accepted"] > 0, results["job_outcomes"]
    assert set(results["job_outcomes"]) == {"succeeded"}
    assert results["answers"].get("429", 0) > 0, "the load did not reach the queue bound"
    for name, memory in results["memory"].items():  # a short run: growth well below what a leak per request makes
        limit_mib = 64 if name == "redis_used_memory" else 200
        assert memory["peak_mib"] - memory["start_mib"] < limit_mib, (name, memory)
