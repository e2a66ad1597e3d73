"""In-process queue of the embedded mode: API and worker share one event loop, nothing leaves the process."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from service import metrics
from service.memory import MemoryProfile
from service.queue.base import (
    GENERATION_FAILED,
    TERMINAL_EVENTS,
    JobQueue,
    QueuedJob,
    QueueStats,
    StoredImages,
    job_state,
    now,
    queue_full,
    state_ttl_s,
)
from service.schemas import JobEvent, JobSpec, JobState, JobStatus


@dataclass
class _Record:
    job: QueuedJob
    status: JobStatus = JobStatus.queued
    timings: dict[str, float] = field(default_factory=dict)
    events: list[JobEvent] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    worker: str | None = None
    cancel_requested: bool = False
    finished_at: float | None = None
    expires_at: float | None = None


class MemoryQueue(JobQueue):
    """A FIFO of job ids plus a dict of job records, bounded by `max_jobs` queued or running jobs."""

    def __init__(self, *, max_jobs: int, result_ttl_s: float, retry_after_s: int) -> None:
        self._max_jobs = max_jobs
        self._result_ttl_s = result_ttl_s
        self._retry_after_s = retry_after_s
        self._records: dict[str, _Record] = {}
        self._waiting: deque[str] = deque()
        self._changed = asyncio.Condition()
        self._live_workers: set[str] = set()
        self._memory_profiles: dict[str, MemoryProfile] = {}
        self.dead_letters: deque[tuple[str, str]] = deque(maxlen=1000)
        """(job id, reason) of the jobs given up, newest last."""

    def _forget_old(self) -> None:
        horizon = now() - state_ttl_s(self._result_ttl_s)
        for job_id in [i for i, r in self._records.items() if r.finished_at and r.finished_at < horizon]:
            del self._records[job_id]

    def _state(self, record: _Record) -> JobState:
        position = self._waiting.index(record.job.spec.id) if record.status == JobStatus.queued else None
        return job_state(
            record.job.spec, record.status, position=position, timings=record.timings, error=record.error,
            error_type=record.error_type, worker=record.worker, deliveries=record.job.deliveries if record.worker else 0,
            finished_at=record.finished_at, expires_at=record.expires_at,
        )

    async def _emit(self, record: _Record, event: JobEvent) -> None:
        async with self._changed:
            record.events.append(event)
            self._changed.notify_all()

    async def _finish(self, record: _Record, status: JobStatus, **data: object) -> None:
        if record.status.terminal:
            return
        record.status, record.finished_at = status, now()
        record.expires_at = record.finished_at + self._result_ttl_s
        record.job.payload = record.job.edit_images = b""
        await self._emit(record, JobEvent(event=status.value, data=data))

    # --- API side ---

    async def admit(self) -> None:
        self._forget_old()
        active = sum(not r.status.terminal for r in self._records.values())
        if active >= self._max_jobs:
            raise queue_full(active, self._retry_after_s)

    async def submit(
        self, spec: JobSpec, payload: bytes, timings: dict[str, float], edit_images: bytes = b""
    ) -> JobState:
        await self.admit()
        job = QueuedJob(spec=spec, payload=payload, edit_images=edit_images, receipt=spec.id)
        record = _Record(job=job, timings=dict(timings))
        self._records[spec.id] = record
        self._waiting.append(spec.id)
        await self._emit(record, JobEvent(event="queued", data={"position": len(self._waiting) - 1}))
        return self._state(record)

    async def get(self, job_id: str) -> JobState | None:
        record = self._records.get(job_id)
        return self._state(record) if record else None

    async def image(self, job_id: str, index: int) -> bytes | None:
        record = self._records.get(job_id)
        if not record or record.status != JobStatus.succeeded or index >= len(record.pngs):
            return None
        if record.expires_at is not None and now() >= record.expires_at:
            record.pngs = []
            return None
        return record.pngs[index]

    async def cancel(self, job_id: str) -> JobState | None:
        record = self._records.get(job_id)
        if record is None:
            return None
        if record.status == JobStatus.queued:
            if job_id in self._waiting:  # else a worker took it and will skip it when it starts the batch
                self._waiting.remove(job_id)
            await self._finish(record, JobStatus.cancelled, reason="cancelled while queued")
            metrics.JOBS.labels(outcome="cancelled").inc()  # no worker sees it end: it is counted here
        elif record.status == JobStatus.running:
            record.cancel_requested = True
        return self._state(record)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        record = self._records.get(job_id)
        if record is None:
            return
        sent = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=sent: len(record.events) > seen)
                new_events = record.events[sent:]
            for event in new_events:
                yield event
                if event.event in TERMINAL_EVENTS:
                    return
            sent += len(new_events)

    async def stats(self) -> QueueStats:
        active = sum(not r.status.terminal for r in self._records.values())
        return QueueStats(depth=active, lag=len(self._waiting), live_workers=len(self._live_workers))

    async def ping(self) -> None:
        return None

    async def memory_profiles(self) -> list[MemoryProfile]:
        return list(self._memory_profiles.values())

    # --- worker side ---

    async def take(self, worker_id: str, max_jobs: int, window_s: float) -> list[QueuedJob]:
        self._live_workers.add(worker_id)
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._waiting))
        if window_s > 0 and len(self._waiting) < max_jobs:
            await asyncio.sleep(window_s)
        taken = []
        while self._waiting and len(taken) < max_jobs:
            taken.append(self._records[self._waiting.popleft()].job)
        return taken

    async def start(self, job: QueuedJob, worker_id: str) -> bool:
        record = self._records[job.spec.id]
        if record.status != JobStatus.queued:
            return False
        record.status, record.worker = JobStatus.running, worker_id
        await self._emit(record, JobEvent(event="started", data={"worker": worker_id}))
        return True

    async def publish(self, job_id: str, event: JobEvent) -> None:
        await self._emit(self._records[job_id], event)

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        return {i for i in job_ids if self._records[i].cancel_requested}

    async def succeed(self, job: QueuedJob, images: StoredImages) -> None:
        record = self._records[job.spec.id]
        if record.status.terminal:
            return
        record.pngs = images.pngs
        record.timings |= images.timings
        await self._finish(record, JobStatus.succeeded)

    async def fail(
        self, job: QueuedJob, reason: str, timings: dict[str, float], error_type: str = GENERATION_FAILED
    ) -> None:
        record = self._records[job.spec.id]
        if record.status.terminal:
            return
        record.error, record.error_type = reason, error_type
        record.timings |= timings
        await self._finish(record, JobStatus.failed, reason=reason)

    async def dead_letter(self, job: QueuedJob, reason: str, error_type: str = GENERATION_FAILED) -> None:
        self.dead_letters.append((job.spec.id, reason))
        await self.fail(job, reason, {}, error_type)
        metrics.JOBS_DEAD_LETTERED.inc()
        metrics.JOBS.labels(outcome="failed").inc()

    async def publish_memory_profile(self, profile: MemoryProfile) -> None:
        self._memory_profiles[profile.worker_id] = profile

    async def finish_cancelled(self, job: QueuedJob) -> None:
        await self._finish(self._records[job.spec.id], JobStatus.cancelled, reason="cancelled while running")
