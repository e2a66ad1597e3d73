"""Every Redis key and name the service uses, in one place."""

from __future__ import annotations

JOBS_STREAM = "dgq:jobs"
"""Stream of submitted jobs; an entry holds only the job id (fields: job)."""
WORKER_GROUP = "dgq-workers"
"""Consumer group of all workers on `JOBS_STREAM`; consumer name = worker id."""
DEAD_LETTER_STREAM = "dgq:jobs:dead"
"""Jobs given up after too many deliveries (fields: job, deliveries, reason)."""
WORKER_PATTERN = "dgq:worker:*"
WORKER_MEMORY = "dgq:worker-memory"
"""Hash: worker id -> its memory profile (JSON, `wire.encode_memory_profile`), rewritten with each heartbeat; the
profiles of workers without a live heartbeat key are ignored, and removed by the reaper."""


def job(job_id: str) -> str:
    """Hash: status, spec (JSON), payload (safetensors, deleted when done), edit_images (safetensors, an edit's
    image and mask, deleted when done), timings, error, worker, entry, cancel, deliveries, completions,
    finished_at, expires_at."""
    return f"dgq:job:{job_id}"


def job_events(job_id: str) -> str:
    """Stream of the job's events (fields: event, data JSON) for SSE and synchronous waits."""
    return f"dgq:job:{job_id}:events"


def job_image(job_id: str, index: int) -> str:
    """PNG bytes of image `index`, with the result TTL."""
    return f"dgq:job:{job_id}:image:{index}"


def worker(worker_id: str) -> str:
    """Heartbeat key of a live worker (expires `worker_ttl_s` after its last heartbeat)."""
    return f"dgq:worker:{worker_id}"


def rate_limit(identity: str) -> str:
    """Hash: token bucket (tokens, ts in ms) of one API key or client address, shared by all API replicas;
    expires once it would be full again."""
    return f"dgq:ratelimit:{identity}"
