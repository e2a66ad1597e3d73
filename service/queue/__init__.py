"""Job queues: one interface (`base.JobQueue`), an in-process backend and a Redis Streams backend."""

from __future__ import annotations

from service.config import Settings
from service.queue.base import JobQueue


def make_queue(settings: Settings) -> JobQueue:
    """The Redis Streams queue when `redis_url` is set, else the in-process one."""
    if settings.redis_url:
        from service.queue.redis_streams import RedisStreamsQueue

        return RedisStreamsQueue(settings)
    from service.queue.memory import MemoryQueue

    return MemoryQueue(
        max_jobs=settings.queue_max, result_ttl_s=settings.result_ttl_s, retry_after_s=settings.retry_after_s
    )
