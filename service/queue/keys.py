"""Every Redis key and name the service uses, in one place."""

from __future__ import annotations

WORKER_GROUP = "dgq-workers"
"""Consumer group of a model's workers on its `jobs_stream`; consumer name = worker id."""
DEAD_LETTER_STREAM = "dgq:dead-letters"
"""Jobs given up, of every model (fields: job, model, entry, deliveries, reason)."""
WORKER_PATTERN = "dgq:worker:*"


def jobs_stream(model: str) -> str:
    """Stream of the jobs submitted to one served model; an entry holds only the job id (fields: job). One stream
    per model, so each model's workers read only its jobs and scale on its backlog (KEDA)."""
    return f"dgq:jobs:{model}"


def worker_memory(model: str) -> str:
    """Hash: worker id -> the memory profile (JSON, `wire.encode_memory_profile`) of one of the model's workers,
    rewritten with each heartbeat; the profiles of workers without a live heartbeat key are ignored, and removed by
    the reaper."""
    return f"dgq:worker-memory:{model}"


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
    """Heartbeat key of a live worker; its value is the name of the model it serves (expires `worker_ttl_s` after
    its last heartbeat)."""
    return f"dgq:worker:{worker_id}"


def rate_limit(identity: str) -> str:
    """Hash: token bucket (tokens, ts in ms) of one API key or client address, shared by all API replicas;
    expires once it would be full again."""
    return f"dgq:ratelimit:{identity}"
