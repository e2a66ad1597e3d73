"""Serving logic between the HTTP routers and the queue: validation against the deployment's limits, the front
stage, waiting, and the lifecycle checks (404 unknown, 410 expired). Raises `service.errors` types only."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.config import Settings
from service.errors import (
    GenerationTimeout,
    InsufficientMemory,
    InvalidRequest,
    JobCancelled,
    JobExpired,
    JobNotFound,
    NotReady,
    job_failure,
)
from service.prompts import PromptStage
from service.queue.base import JobQueue
from service.schemas import GenerateRequest, JobEvent, JobSpec, JobState, JobStatus
from service.worker import Worker

MODEL_SCHEDULER = "model-default"
"""Requests cannot choose the scheduler: every job uses the model's own (part of the batch key all the same)."""


@dataclass
class Generated:
    state: JobState
    pngs: list[bytes]


class GenerationService:
    """What the routers call."""

    def __init__(
        self, settings: Settings, queue: JobQueue, prompts: PromptStage, worker: Worker | None = None
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.prompts = prompts
        self.model = prompts.model
        self.worker = worker
        self.started_at = int(time.time())

    def _check_limits(self, request: GenerateRequest) -> tuple[int, int]:
        native_width, native_height = self.model.native_size
        width, height = request.width or native_width, request.height or native_height
        problems = self.model.limit_problems(width, height, request.steps, request.num_images)
        for field in ("prompt", "negative_prompt"):
            # Before tokenizing: the tokenizer's work grows with the text, the token limit is checked after it.
            if (chars := len(getattr(request, field))) > self.settings.max_prompt_chars:
                problems.append(
                    f"{field} is {chars} characters long, above the limit {self.settings.max_prompt_chars}: shorten it"
                )
        if problems:
            raise InvalidRequest("; ".join(problems))
        return width, height

    async def _check_memory(self, width: int, height: int, request: GenerateRequest) -> None:
        """Refuse a request that does not fit, even alone, the memory of every live worker that published its
        measurements (`service.memory`): any of them may take it. Without any published yet it is admitted, and
        the worker that takes it checks it again."""
        for profile in sorted(await self.queue.memory_profiles(), key=lambda profile: profile.budget_bytes):
            if refusal := profile.refusal(width, height, request.num_images, request.guidance_scale):
                raise InsufficientMemory(refusal)

    async def submit(self, request: GenerateRequest) -> JobState:
        """Validate against the model's limits and the workers' memory, encode the prompts (which checks their token
        length), enqueue; the queued job's state."""
        width, height = self._check_limits(request)
        await self._check_memory(width, height, request)
        await self.queue.admit()  # at the bound, answer 429 before the text encoder's work
        payload, encode_s = await self.prompts.encode(request.prompt, request.negative_prompt)
        spec = JobSpec(
            id=secrets.token_hex(12), width=width, height=height, steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            num_images=request.num_images, scheduler=MODEL_SCHEDULER,
        )
        return await self.queue.submit(spec, payload, {"text_encode_s": encode_s})

    async def generate(self, request: GenerateRequest) -> Generated:
        """Submit and wait up to the request timeout for the images."""
        submitted = await self.submit(request)
        state = await self.queue.wait(submitted.id, self.settings.request_timeout_s)
        if state is None or state.status == JobStatus.failed:
            raise job_failure(state and state.error_type, state.error if state else "job lost", submitted.id)
        if state.status == JobStatus.cancelled:
            raise JobCancelled("the job was cancelled before it finished", job_id=state.id)
        if state.status != JobStatus.succeeded:
            raise GenerationTimeout(
                f"the job did not finish within {self.settings.request_timeout_s:g} s; it is still {state.status}: "
                f"poll /jobs/{state.id}", job_id=state.id,
            )
        pngs = [await self.image(state.id, n) for n in range(state.num_images)]
        return Generated(state=state, pngs=pngs)

    async def job(self, job_id: str) -> JobState:
        state = await self.queue.get(job_id)
        if state is None:
            raise JobNotFound(f"no job {job_id!r}: check the id", job_id=job_id)
        if state.expired:
            raise JobExpired(
                f"job {job_id} ended and its results were deleted after {self.settings.result_ttl_s:g} s; "
                "submit it again", job_id=job_id,
            )
        return state

    async def image(self, job_id: str, index: int) -> bytes:
        state = await self.job(job_id)
        if index < 0 or index >= state.num_images:
            raise JobNotFound(f"job {job_id} has images 0..{state.num_images - 1}, not {index}", job_id=job_id)
        if state.status != JobStatus.succeeded:
            raise JobNotFound(f"job {job_id} is {state.status}: images exist only once it succeeded", job_id=job_id)
        png = await self.queue.image(job_id, index)
        if png is None:
            raise JobExpired(f"the images of job {job_id} expired; submit it again", job_id=job_id)
        return png

    async def cancel(self, job_id: str) -> JobState:
        await self.job(job_id)
        return await self.queue.cancel(job_id)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        await self.job(job_id)
        return self.queue.events(job_id)

    async def readiness(self) -> dict[str, bool]:
        """Checks of `/readyz`; raises `NotReady` naming the failing ones."""
        checks = {"text_encoder_loaded": self.prompts is not None}
        if self.worker is not None:
            checks["embedded_worker_warm"] = self.worker.ready
        try:
            await self.queue.ping()
            stats = await self.queue.stats()
            checks["queue_reachable"] = True
            checks["live_worker"] = stats.live_workers >= 1 or bool(self.worker and self.worker.ready)
        except Exception:
            checks["queue_reachable"] = checks["live_worker"] = False
        failing = [name for name, ok in checks.items() if not ok]
        if failing:
            raise NotReady(f"not ready: {', '.join(failing)}", retry_after_s=self.settings.retry_after_s)
        return checks
