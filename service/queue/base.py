"""The one job-queue interface; `memory.MemoryQueue` (embedded) and `redis_streams.RedisStreamsQueue` implement it.

Each served model has its own queue of jobs (`JobSpec.model`), bound, workers and memory profiles; a worker takes
the jobs of the one model it serves.

A job is a `JobSpec` (JSON) plus one safetensors blob (prompt embeddings and prompt-specific parameters) and, for
an edit, a second one with its image and mask (`wire.encode_edit_images`).
Its state moves queued -> running -> succeeded | failed | cancelled (or queued -> cancelled); images are stored
for `result_ttl_s` after it ends, its state for longer so that late readers get 410 instead of 404.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from service.errors import GenerationFailed, QueueFull
from service.memory import MemoryProfile
from service.schemas import JobEvent, JobSpec, JobState, JobStatus

TERMINAL_EVENTS = {status.value for status in JobStatus if status.terminal}
GENERATION_FAILED = GenerationFailed.__name__
"""The `error_type` of a job that failed for any reason but memory."""


def state_ttl_s(result_ttl_s: float) -> float:
    """How long a job's state outlives its images (answers 410 meanwhile)."""
    return max(24 * 3600.0, 10 * result_ttl_s)


@dataclass
class QueuedJob:
    """A job as a worker holds it."""

    spec: JobSpec
    payload: bytes
    model: str
    """The model whose queue the job came from (and is acknowledged in)."""
    edit_images: bytes = b""
    """An edit job's image and mask (`wire.encode_edit_images`); empty for text-to-image."""
    deliveries: int = 1
    receipt: str = ""
    """Backend handle to acknowledge it with (the stream entry id)."""


@dataclass
class QueueStats:
    depth: int
    """Jobs queued or running."""
    lag: int
    """Jobs not yet delivered to a worker."""
    live_workers: int


@dataclass
class StoredImages:
    """What `JobQueue.succeed` stores: the PNGs and the stage timings."""

    pngs: list[bytes]
    timings: dict[str, float] = field(default_factory=dict)


class JobQueue(abc.ABC):
    """Submit, observe and cancel jobs (API side); take, run, finish them (worker side)."""

    # --- API side ---

    @abc.abstractmethod
    async def admit(self, model: str) -> None:
        """Raise `QueueFull` if a job for `model` submitted now would be refused: a cheap check before the prompt
        stage's work, so that an overloaded API answers 429 without encoding prompts (`submit` checks again)."""

    @abc.abstractmethod
    async def submit(
        self, spec: JobSpec, payload: bytes, timings: dict[str, float], edit_images: bytes = b""
    ) -> JobState:
        """Enqueue a job for `spec.model`; raises `QueueFull` at the bound and `QueueUnavailable` when the backend
        is down."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> JobState | None:
        """The job's state (with queue position while queued), None if unknown or forgotten."""

    @abc.abstractmethod
    async def image(self, job_id: str, index: int) -> bytes | None:
        """PNG number `index` of a succeeded job, None once expired."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> JobState | None:
        """Cancel a job (idempotent): queued jobs end at once, running ones at the next step."""

    @abc.abstractmethod
    def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events from the first, ending after its terminal event."""

    @abc.abstractmethod
    async def stats(self, model: str) -> QueueStats:
        """Depth, lag and live workers of `model`'s queue."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `QueueUnavailable` if the backend cannot be reached."""

    @abc.abstractmethod
    async def memory_profiles(self, model: str) -> list[MemoryProfile]:
        """The memory profiles `model`'s live workers published (`publish_memory_profile`)."""

    async def wait(self, job_id: str, timeout_s: float) -> JobState | None:
        """Wait until the job ends or `timeout_s` passes; the state then."""
        try:
            async with asyncio.timeout(timeout_s):
                async for event in self.events(job_id):
                    if event.event in TERMINAL_EVENTS:
                        break
        except TimeoutError:
            pass
        return await self.get(job_id)

    # --- worker side ---

    @abc.abstractmethod
    async def take(self, worker_id: str, model: str, max_jobs: int, window_s: float) -> list[QueuedJob]:
        """Block until at least one job for `model` is there, then gather up to `max_jobs` within `window_s`."""

    @abc.abstractmethod
    async def start(self, job: QueuedJob, worker_id: str) -> bool:
        """Mark the job running on `worker_id`; False (and acknowledged) if it was cancelled or already ended."""

    @abc.abstractmethod
    async def publish(self, job_id: str, event: JobEvent) -> None: ...

    @abc.abstractmethod
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Those of `job_ids` whose cancellation was asked for."""

    @abc.abstractmethod
    async def succeed(self, job: QueuedJob, images: StoredImages) -> None:
        """Store the images (with TTL), mark the job succeeded, then acknowledge it - once, whoever calls."""

    @abc.abstractmethod
    async def fail(
        self, job: QueuedJob, reason: str, timings: dict[str, float], error_type: str = GENERATION_FAILED
    ) -> None:
        """Fail the job with `reason`; `error_type` names the `service.errors` type a synchronous request answers."""

    @abc.abstractmethod
    async def dead_letter(self, job: QueuedJob, reason: str, error_type: str = GENERATION_FAILED) -> None:
        """Give the job up: keep it among the dead letters (for inspection) and fail it with `reason`."""

    @abc.abstractmethod
    async def publish_memory_profile(self, model: str, profile: MemoryProfile) -> None:
        """Tell the API what the memory of this worker of `model` admits (renewed with the heartbeats; gone when it
        dies)."""

    @abc.abstractmethod
    async def finish_cancelled(self, job: QueuedJob) -> None: ...

    async def heartbeat(self, worker_id: str, model: str, jobs: list[QueuedJob]) -> None:
        """Tell the backend this worker of `model` is alive and still holds `jobs` (nothing to do in-process)."""
        return None

    async def reap(self, worker_id: str, model: str) -> list[QueuedJob]:
        """Take over the jobs of `model`'s dead workers (those over the delivery limit go to the dead letters)."""
        return []

    async def close(self) -> None:
        """Release connections (nothing to release in-process)."""
        return None


def job_state(
    spec: JobSpec, status: JobStatus, *, position: int | None = None, timings: dict[str, float] | None = None,
    error: str | None = None, error_type: str | None = None, worker: str | None = None, deliveries: int = 0,
    finished_at: float | None = None, expires_at: float | None = None,
) -> JobState:
    """A `JobState` with image URLs filled in once succeeded."""
    images = [f"/jobs/{spec.id}/images/{n}" for n in range(spec.num_images)] if status == JobStatus.succeeded else []
    return JobState(
        id=spec.id, model=spec.model, status=status, position=position if status == JobStatus.queued else None,
        num_images=spec.num_images, seeds=spec.seeds, images=images, timings=timings or {}, error=error,
        error_type=error_type, worker=worker,
        deliveries=deliveries, created_at=spec.created_at, finished_at=finished_at, expires_at=expires_at,
    )


def queue_full(depth: int, retry_after_s: int) -> QueueFull:
    """The 429 error of a queue holding `depth` jobs, at its bound."""
    return QueueFull(f"{depth} jobs are queued or running (the limit); retry after a few seconds.",
                     retry_after_s=retry_after_s)


def now() -> float:
    return time.time()
