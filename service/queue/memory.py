"""In-process queue of the embedded mode: API and worker share one event loop, nothing leaves the process."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
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
    """A FIFO of job ids per model plus a dict of job records, bounded by `max_jobs` queued or running jobs per
    model."""

    def __init__(self, *, max_jobs: int, result_ttl_s: float, retry_after_s: int) -> None:
        self._max_jobs = max_jobs
        self._result_ttl_s = result_ttl_s
        self._retry_after_s = retry_after_s
        self._records: dict[str, _Record] = {}
        self._waiting: defaultdict[str, deque[str]] = defaultdict(deque)
        """Model -> ids of its queued jobs, oldest first."""
        self._changed = asyncio.Condition()
        self._live_workers: dict[str, str] = {}
        """Worker id -> the model it serves."""
        self._memory_profiles: defaultdict[str, dict[str, MemoryProfile]] = defaultdict(dict)
        """Model -> worker id -> the profile it published."""
        self.dead_letters: deque[tuple[str, str]] = deque(maxlen=1000)
        """(job id, reason) of the jobs given up, newest last."""

    def _forget_old(self) -> None:
        horizon = now() - state_ttl_s(self._result_ttl_s)
        for job_id in [i for i, r in self._records.items() if r.finished_at and r.finished_at < horizon]:
            del self._records[job_id]

    def _state(self, record: _Record) -> JobState:
        waiting = self._waiting[record.job.model]
        position = waiting.index(record.job.spec.id) if record.status == JobStatus.queued else None
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

    def _active(self, model: str) -> int:
        return sum(not r.status.terminal and r.job.model == model for r in self._records.values())

    async def admit(self, model: str) -> None:
        self._forget_old()
        if (active := self._active(model)) >= self._max_jobs:
            raise queue_full(active, self._retry_after_s)

    async def submit(
        self, spec: JobSpec, payload: bytes, timings: dict[str, float], edit_images: bytes = b""
    ) -> JobState:
        await self.admit(spec.model)
        job = QueuedJob(spec=spec, payload=payload, model=spec.model, edit_images=edit_images, receipt=spec.id)
        record = _Record(job=job, timings=dict(timings))
        self._records[spec.id] = record
        waiting = self._waiting[spec.model]
        waiting.append(spec.id)
        await self._emit(record, JobEvent(event="queued", data={"position": len(waiting) - 1}))
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
            waiting = self._waiting[record.job.model]
            if job_id in waiting:  # else a worker took it and will skip it when it starts the batch
                waiting.remove(job_id)
            await self._finish(record, JobStatus.cancelled, reason="cancelled while queued")
            # no worker sees it end: it is counted here
            metrics.JOBS.labels(model=record.job.model, outcome="cancelled").inc()
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

    async def stats(self, model: str) -> QueueStats:
        live = sum(served == model for served in self._live_workers.values())
        return QueueStats(depth=self._active(model), lag=len(self._waiting[model]), live_workers=live)

    async def ping(self) -> None:
        return None

    async def memory_profiles(self, model: str) -> list[MemoryProfile]:
        return list(self._memory_profiles[model].values())

    # --- worker side ---

    async def take(self, worker_id: str, model: str, max_jobs: int, window_s: float) -> list[QueuedJob]:
        self._live_workers[worker_id] = model
        waiting = self._waiting[model]
        async with self._changed:
            await self._changed.wait_for(lambda: bool(waiting))
        if window_s > 0 and len(waiting) < max_jobs:
            await asyncio.sleep(window_s)
        taken = []
        while waiting and len(taken) < max_jobs:
            taken.append(self._records[waiting.popleft()].job)
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
        metrics.JOBS_DEAD_LETTERED.labels(model=job.model).inc()
        metrics.JOBS.labels(model=job.model, outcome="failed").inc()

    async def publish_memory_profile(self, model: str, profile: MemoryProfile) -> None:
        self._memory_profiles[model][profile.worker_id] = profile

    async def finish_cancelled(self, job: QueuedJob) -> None:
        await self._finish(self._records[job.spec.id], JobStatus.cancelled, reason="cancelled while running")
