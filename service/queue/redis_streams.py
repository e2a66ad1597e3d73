"""Redis Streams backend: a job stream and consumer group per served model, heartbeats, a reaper for dead workers,
dead letters.

- Submit: job hash (spec + safetensors payload, and an edit's images), then `XADD dgq:jobs:<model> {job: id}` in a
  script that checks the model's bound `queue_max` in the same step, so concurrent submits cannot overshoot it.
- Workers: `XREADGROUP COUNT max_batch` on their model's stream (+ a short window for more), run, store PNGs under keys with a TTL,
  mark succeeded, then `XACK` + `XDEL` - acknowledged only after the result is stored.
- Heartbeat: every few seconds a worker renews its key (TTL `worker_ttl_s`) and `XCLAIM ... JUSTID`s the entries
  it holds, which resets their idle time: a live worker's long job never looks idle.
- Reaper: `XAUTOCLAIM` of entries idle longer than `worker_ttl_s` (so only from dead workers); past
  `max_deliveries` a job goes to the dead-letter stream and fails with that reason.
- Dead letters: besides those, entries a worker cannot even read (no job id, a spec that does not parse, no
  payload) and jobs that fail however they are batched; the stream is trimmed to `DEAD_LETTERS_MAXLEN`.
- State transitions are Lua scripts, so a job ends exactly once whoever finishes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import metrics
from service.config import Settings
from service.errors import QueueUnavailable
from service.memory import MemoryProfile
from service.queue import keys, wire
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

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
"""Longest a worker's read blocks, so it reaps and notices shutdown at least this often."""
EVENTS_MAXLEN = 2000
DEAD_LETTERS_MAXLEN = 10_000
"""Dead letters kept for inspection; older ones are trimmed so that a flood of bad jobs cannot fill Redis."""

_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == status then
    local images = #KEYS - 1
    for i = 1, images do redis.call('SET', KEYS[i + 1], ARGV[3 + i], 'PX', ARGV[3]) end
    redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 4 + images))
    if ARGV[2] == 'succeeded' then redis.call('HINCRBY', KEYS[1], 'completions', 1) end
    return 1
  end
end
return 0
"""
"""Atomically: if the job's status is one of ARGV[1] (comma-separated), store the images (KEYS[2..], values
ARGV[4..], TTL ARGV[3] ms), set status ARGV[2] and the remaining field/value pairs; count successes in
'completions'. Returns 1 when moved, 0 when the job is in another status, -1 when it does not exist."""

_ENQUEUE = """
local entry = redis.call('HGET', KEYS[2], 'entry')
if entry then return entry end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[2])
  return depth
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'event', 'queued', 'data', '{}')
entry = redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[2], 'entry', entry)
return entry
"""
"""Atomically, so that concurrent submits cannot overshoot the bound: unless the jobs stream KEYS[1] holds ARGV[1]
entries already, emit the 'queued' event (KEYS[3], trimmed to about ARGV[3]), add the entry of job ARGV[2] and note
it in the job hash KEYS[2]; returns the entry id. At the bound the job hash is deleted and the depth (an integer)
returned. A job that has its entry gets it back, so a retried call whose reply was lost adds nothing."""

P = ParamSpec("P")
R = TypeVar("R")


def _unavailable_on_connection_error(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise QueueUnavailable(
                f"the job queue (Redis) is unreachable: {error}; retry shortly", retry_after_s=args[0]._retry_after_s
            ) from error

    return wrapper


def connect(redis_url: str, socket_timeout_s: float) -> aioredis.Redis:
    """An asyncio Redis client that rides out a Redis restart: the connections it pooled before are dead, and
    without a retry on a fresh connection each of them would fail one command after Redis is back (a 503 per
    pooled connection). Commands are retried twice, with jittered backoff.

    Args:
        redis_url (`str`): redis://host:port/db.
        socket_timeout_s (`float`): longest wait for a reply (above any blocking read's own timeout).
    """
    return aioredis.Redis.from_url(
        redis_url, socket_connect_timeout=2, socket_timeout=socket_timeout_s, health_check_interval=10,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


class RedisStreamsQueue(JobQueue):
    """`JobQueue` on a Redis server shared by the API processes and the workers."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._retry_after_s = settings.retry_after_s
        # A retried write whose reply was lost can run twice; the status transitions are idempotent and a job ends
        # once regardless.
        self._redis = connect(settings.redis_url, socket_timeout_s=READ_BLOCK_MS / 1000 + 5)
        self._transition_script = self._redis.register_script(_TRANSITION)
        self._enqueue_script = self._redis.register_script(_ENQUEUE)
        self._groups_ready: set[str] = set()
        """The models whose stream and consumer group exist (as far as this process knows)."""

    async def _transition(
        self, job_id: str, allowed: list[JobStatus], to: JobStatus, pngs: list[bytes] = (), **fields: object
    ) -> int:
        pairs = [str(item) for pair in fields.items() for item in pair]
        image_keys = [keys.job_image(job_id, index) for index in range(len(pngs))]
        ttl_ms = int(self._settings.result_ttl_s * 1000)
        return await self._transition_script(
            keys=[keys.job(job_id), *image_keys], args=[",".join(allowed), to.value, ttl_ms, *pngs, *pairs]
        )

    async def _ensure_group(self, model: str) -> None:
        if model in self._groups_ready:
            return
        try:
            await self._redis.xgroup_create(keys.jobs_stream(model), keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._groups_ready.add(model)

    async def _emit(self, job_id: str, event: JobEvent) -> None:
        await self._redis.xadd(
            keys.job_events(job_id), wire.encode_event(event),
            maxlen=EVENTS_MAXLEN, approximate=True,
        )

    async def _ack(self, model: str, receipt: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.jobs_stream(model), keys.WORKER_GROUP, receipt)
            pipe.xdel(keys.jobs_stream(model), receipt)
            await pipe.execute()

    async def _finish(
        self, job_id: str, model: str, receipt: str, status: JobStatus, allowed: list[JobStatus],
        pngs: list[bytes] = (), **fields: object,
    ) -> bool:
        """Move a job to a terminal status (once, with its images), expire its state, emit the event, then
        acknowledge the entry `receipt` (if any) of `model`'s stream."""
        finished_at = now()
        moved = await self._transition(
            job_id, allowed, status, pngs, finished_at=finished_at,
            expires_at=finished_at + self._settings.result_ttl_s, **fields,
        )
        if moved == 1:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hdel(keys.job(job_id), "payload", "edit_images")
                pipe.expire(keys.job(job_id), int(state_ttl_s(self._settings.result_ttl_s)))
                # the events (a few per denoising step) go with the images: once those expired, readers get 410
                pipe.expire(keys.job_events(job_id), max(int(self._settings.result_ttl_s), 1))
                await pipe.execute()
            data = {"reason": fields["error"]} if "error" in fields else {}
            await self._emit(job_id, JobEvent(event=status.value, data=data))
        if receipt:
            await self._ack(model, receipt)
        return moved == 1

    async def _dead_letter(
        self, job_id: str, model: str, receipt: str, reason: str, deliveries: int, error_type: str = GENERATION_FAILED
    ) -> None:
        """Record the job in the dead-letter stream, fail it with `reason` (if it exists) and acknowledge its
        entry in `model`'s stream. The record comes first: a crash in between leaves the entry pending, to be
        dead-lettered again."""
        await self._redis.xadd(
            keys.DEAD_LETTER_STREAM,
            {"job": job_id, "model": model, "entry": receipt, "deliveries": deliveries, "reason": reason},
            maxlen=DEAD_LETTERS_MAXLEN, approximate=True,
        )
        await self._finish(job_id, model, receipt, JobStatus.failed, [JobStatus.queued, JobStatus.running],
                           error=reason, error_type=error_type)
        metrics.JOBS_DEAD_LETTERED.labels(model=model).inc()
        metrics.JOBS.labels(model=model, outcome="failed").inc()

    # --- API side ---

    @_unavailable_on_connection_error
    async def admit(self, model: str) -> None:
        depth = await self._redis.xlen(keys.jobs_stream(model))
        if depth >= self._settings.queue_max:
            raise queue_full(depth, self._retry_after_s)

    @_unavailable_on_connection_error
    async def submit(
        self, spec: JobSpec, payload: bytes, timings: dict[str, float], edit_images: bytes = b""
    ) -> JobState:
        await self._ensure_group(spec.model)
        job_key = keys.job(spec.id)
        fields = {
            "spec": wire.encode_spec(spec), "payload": payload, "status": JobStatus.queued.value,
            "timings": wire.encode_timings(timings), "deliveries": 0, "completions": 0,
        }
        if edit_images:
            fields["edit_images"] = edit_images
        await self._redis.hset(job_key, mapping=fields)
        entry = await self._enqueue_script(
            keys=[keys.jobs_stream(spec.model), job_key, keys.job_events(spec.id)],
            args=[self._settings.queue_max, spec.id, EVENTS_MAXLEN],
        )
        if isinstance(entry, int):
            raise queue_full(entry, self._retry_after_s)
        return await self.get(spec.id)

    async def _position(self, model: str, entry: bytes | None) -> int | None:
        if entry is None:
            return None
        stream = keys.jobs_stream(model)
        groups = await self._redis.xinfo_groups(stream)
        last = next((g["last-delivered-id"] for g in groups if g["name"] == keys.WORKER_GROUP.encode()), b"0-0")
        ahead = await self._redis.xrange(stream, min=b"(" + last, max=entry)
        return max(len(ahead) - 1, 0)

    @_unavailable_on_connection_error
    async def get(self, job_id: str) -> JobState | None:
        fields = ("spec", "status", "timings", "error", "error_type", "worker", "deliveries", "finished_at",
                  "expires_at", "entry")
        values = dict(zip(fields, await self._redis.hmget(keys.job(job_id), fields), strict=True))
        if values["spec"] is None:
            return None
        status = JobStatus(_text(values["status"]))
        spec = wire.decode_spec(values["spec"])
        return job_state(
            spec, status,
            position=await self._position(spec.model, values["entry"]) if status == JobStatus.queued else None,
            timings=wire.decode_timings(values["timings"]), error=_text(values["error"]),
            error_type=_text(values["error_type"]), worker=_text(values["worker"]), deliveries=int(values["deliveries"] or 0),
            finished_at=float(values["finished_at"]) if values["finished_at"] else None,
            expires_at=float(values["expires_at"]) if values["expires_at"] else None,
        )

    @_unavailable_on_connection_error
    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self._redis.get(keys.job_image(job_id, index))

    @_unavailable_on_connection_error
    async def cancel(self, job_id: str) -> JobState | None:
        state = await self.get(job_id)
        if state is None:
            return None
        if state.status == JobStatus.queued:
            entry = await self._redis.hget(keys.job(job_id), "entry")
            if await self._finish(job_id, state.model, _text(entry) or "", JobStatus.cancelled, [JobStatus.queued],
                                  error="cancelled while queued"):
                # no worker sees it end: it is counted here
                metrics.JOBS.labels(model=state.model, outcome="cancelled").inc()
        await self._redis.hset(keys.job(job_id), "cancel", 1)
        return await self.get(job_id)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        last_id = b"0-0"
        while True:
            try:
                reply = await self._redis.xread({keys.job_events(job_id): last_id}, block=READ_BLOCK_MS, count=100)
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                raise QueueUnavailable(f"the job queue (Redis) is unreachable: {error}",
                                       retry_after_s=self._retry_after_s) from error
            for _, entries in reply:
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = wire.decode_event(fields)
                    yield event
                    if event.event in TERMINAL_EVENTS:
                        return

    @_unavailable_on_connection_error
    async def stats(self, model: str) -> QueueStats:
        await self._ensure_group(model)
        stream = keys.jobs_stream(model)
        depth = await self._redis.xlen(stream)
        groups = await self._redis.xinfo_groups(stream)
        lag = next((g.get("lag") for g in groups if g["name"] == keys.WORKER_GROUP.encode()), None)
        live = [key async for key in self._redis.scan_iter(match=keys.WORKER_PATTERN, count=1000)]
        served = await self._redis.mget(live) if live else []
        return QueueStats(depth=depth, lag=int(lag or 0), live_workers=served.count(model.encode()))

    @_unavailable_on_connection_error
    async def ping(self) -> None:
        await self._redis.ping()

    async def _live_profiles(self, model: str) -> tuple[list[MemoryProfile], list[bytes]]:
        """The published memory profiles of `model`'s live workers, and the ids of those without a heartbeat."""
        published = await self._redis.hgetall(keys.worker_memory(model))
        ids = list(published)
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.exists(keys.worker(worker_id.decode()))
            alive = await pipe.execute()
        profiles, dead = [], []
        for worker_id, live in zip(ids, alive, strict=True):
            if not live:
                dead.append(worker_id)
                continue
            try:
                profiles.append(wire.decode_memory_profile(published[worker_id]))
            except ValidationError:
                log.warning("ignoring the unreadable memory profile of worker %s", worker_id.decode(errors="replace"))
        return profiles, dead

    @_unavailable_on_connection_error
    async def memory_profiles(self, model: str) -> list[MemoryProfile]:
        return (await self._live_profiles(model))[0]

    @_unavailable_on_connection_error
    async def publish_memory_profile(self, model: str, profile: MemoryProfile) -> None:
        # with a heartbeat in the same step: the reaper removes profiles without one
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.worker(profile.worker_id), model, px=int(self._settings.worker_ttl_s * 1000))
            pipe.hset(keys.worker_memory(model), profile.worker_id, wire.encode_memory_profile(profile))
            await pipe.execute()

    # --- worker side ---

    async def _read(self, worker_id: str, model: str, count: int, block_ms: int | None) -> list[tuple[bytes, dict]]:
        try:
            reply = await self._redis.xreadgroup(
                keys.WORKER_GROUP, worker_id, {keys.jobs_stream(model): ">"}, count=count, block=block_ms
            )
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self._groups_ready.discard(model)  # Redis lost its data (restart without persistence): recreate it
            await self._ensure_group(model)
            return []
        return [entry for _, entries in reply for entry in entries]

    async def _load_jobs(self, model: str, entries: list[tuple[bytes, dict]], deliveries: int = 1) -> list[QueuedJob]:
        """The jobs the entries of `model`'s stream point at. Entries of jobs that ended are acknowledged; entries
        or jobs that cannot be read (written by something else than `submit`) are dead-lettered with the reason."""
        jobs = []
        for entry_id, fields in entries:
            receipt = entry_id.decode()
            try:
                job_id = fields[b"job"].decode()
            except (KeyError, UnicodeDecodeError):
                reason = f"malformed stream entry {receipt}: no job id (fields: {sorted(fields)})"
                await self._dead_letter("", model, receipt, reason, deliveries)
                continue
            spec, payload, edit_images, status = await self._redis.hmget(
                keys.job(job_id), ["spec", "payload", "edit_images", "status"]
            )
            if status is None or status.decode(errors="replace") in TERMINAL_EVENTS:  # ended, or state expired
                await self._ack(model, receipt)
                continue
            try:
                if payload is None:
                    raise ValueError("it has no payload (prompt tensors)")
                job_spec = wire.decode_spec(spec or b"")
                if job_spec.mode != "text" and edit_images is None:
                    raise ValueError(f"it is an edit ({job_spec.mode}) without its images")
                jobs.append(QueuedJob(spec=job_spec, payload=payload, model=model, edit_images=edit_images or b"",
                                      receipt=receipt, deliveries=deliveries))
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in error.errors())
                await self._dead_letter(job_id, model, receipt, f"malformed job {job_id}: spec {problems}", deliveries)
            except ValueError as error:
                await self._dead_letter(job_id, model, receipt, f"malformed job {job_id}: {error}", deliveries)
        return jobs

    @_unavailable_on_connection_error
    async def take(self, worker_id: str, model: str, max_jobs: int, window_s: float) -> list[QueuedJob]:
        await self._ensure_group(model)
        entries = await self._read(worker_id, model, max_jobs, READ_BLOCK_MS)
        if entries and len(entries) < max_jobs and window_s > 0:
            await asyncio.sleep(window_s)
            entries += await self._read(worker_id, model, max_jobs - len(entries), None)
        return await self._load_jobs(model, entries)

    @_unavailable_on_connection_error
    async def start(self, job: QueuedJob, worker_id: str) -> bool:
        # 'running' is allowed too: a job reclaimed from a dead worker is still marked running
        moved = await self._transition(job.spec.id, [JobStatus.queued, JobStatus.running], JobStatus.running,
                                       worker=worker_id)
        if moved != 1:
            await self._ack(job.model, job.receipt)
            return False
        job.deliveries = await self._redis.hincrby(keys.job(job.spec.id), "deliveries", 1)
        await self._emit(job.spec.id, JobEvent(event="started", data={"worker": worker_id}))
        return True

    @_unavailable_on_connection_error
    async def publish(self, job_id: str, event: JobEvent) -> None:
        await self._emit(job_id, event)

    @_unavailable_on_connection_error
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "cancel")
            flags = await pipe.execute()
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag}

    @_unavailable_on_connection_error
    async def succeed(self, job: QueuedJob, images: StoredImages) -> None:
        stored_timings = await self._redis.hget(keys.job(job.spec.id), "timings")
        timings = wire.decode_timings(stored_timings) | images.timings
        await self._finish(job.spec.id, job.model, job.receipt, JobStatus.succeeded, [JobStatus.running], images.pngs,
                           timings=wire.encode_timings(timings))

    @_unavailable_on_connection_error
    async def fail(
        self, job: QueuedJob, reason: str, timings: dict[str, float], error_type: str = GENERATION_FAILED
    ) -> None:
        await self._finish(job.spec.id, job.model, job.receipt, JobStatus.failed,
                           [JobStatus.queued, JobStatus.running], error=reason, error_type=error_type)

    @_unavailable_on_connection_error
    async def dead_letter(self, job: QueuedJob, reason: str, error_type: str = GENERATION_FAILED) -> None:
        await self._dead_letter(job.spec.id, job.model, job.receipt, reason, job.deliveries, error_type)

    @_unavailable_on_connection_error
    async def finish_cancelled(self, job: QueuedJob) -> None:
        await self._finish(job.spec.id, job.model, job.receipt, JobStatus.cancelled, [JobStatus.running],
                           error="cancelled while running")

    @_unavailable_on_connection_error
    async def heartbeat(self, worker_id: str, model: str, jobs: list[QueuedJob]) -> None:
        await self._redis.set(keys.worker(worker_id), model, px=int(self._settings.worker_ttl_s * 1000))
        if jobs:
            await self._redis.xclaim(
                keys.jobs_stream(model), keys.WORKER_GROUP, worker_id, min_idle_time=0,
                message_ids=[job.receipt for job in jobs], justid=True,
            )

    @_unavailable_on_connection_error
    async def reap(self, worker_id: str, model: str) -> list[QueuedJob]:
        await self._ensure_group(model)
        _, dead = await self._live_profiles(model)
        if dead:
            await self._redis.hdel(keys.worker_memory(model), *dead)
        min_idle_ms = int(self._settings.worker_ttl_s * 1000)
        stream = keys.jobs_stream(model)
        _, entries, _ = await self._redis.xautoclaim(
            stream, keys.WORKER_GROUP, worker_id, min_idle_time=min_idle_ms, start_id="0-0",
            count=self._settings.max_batch,
        )
        reclaimed = []
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile
                continue
            pending = await self._redis.xpending_range(stream, keys.WORKER_GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = pending[0]["times_delivered"] if pending else 1
            for job in await self._load_jobs(model, [(entry_id, fields)], deliveries):
                if job.deliveries > self._settings.max_deliveries:
                    reason = f"gave up after {job.deliveries - 1} deliveries: the workers running it died each time"
                    await self._dead_letter(job.spec.id, model, job.receipt, reason, job.deliveries)
                    continue
                reclaimed.append(job)
        return reclaimed

    async def close(self) -> None:
        await self._redis.aclose()
