"""Serving logic between the HTTP routers and the queue: validation against the deployment's limits, the front
stage, waiting, and the lifecycle checks (404 unknown, 410 expired). Raises `service.errors` types only."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from service import metrics
from service.config import Settings
from service.errors import (
    GenerationTimeout,
    InsufficientMemory,
    InvalidRequest,
    JobCancelled,
    JobExpired,
    JobNotFound,
    NotReady,
    UnknownModel,
    job_failure,
)
from service.images import EditImages, decode_base64, prepare_edit
from service.prompts import PromptStage
from service.queue import wire
from service.queue.base import JobQueue
from service.schemas import (
    MAX_PREVIEW_EVERY,
    GenerateRequest,
    JobEvent,
    JobMode,
    JobSpec,
    JobState,
    JobStatus,
    LoRAEntry,
)
from service.served_model import ServedModel
from service.worker import Worker

IMAGE_TO_IMAGE_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0
"""`strength` of a request that gives none: image-to-image keeps the composition, inpainting redraws the masked
area from noise (the pixels outside the mask are kept either way)."""


def default_strength(has_mask: bool) -> float:
    return INPAINT_STRENGTH if has_mask else IMAGE_TO_IMAGE_STRENGTH


@dataclass
class Generated:
    state: JobState
    pngs: list[bytes]


class GenerationService:
    """What the routers call.

    Args:
        settings (`Settings`): the deployment's settings.
        queue (`JobQueue`): the job queue.
        prompts (`dict[str, PromptStage]`): the prompt stage of every served model, by name, the default model
            (`Settings.default_model`) first.
        workers (`list[Worker]`): the workers running in this process (embedded mode), one per model.
    """

    def __init__(
        self, settings: Settings, queue: JobQueue, prompts: dict[str, PromptStage], workers: list[Worker] = ()
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.prompts = prompts
        self.models = {name: stage.model for name, stage in prompts.items()}
        self.workers = list(workers)
        self.started_at = int(time.time())

    def stage(self, model: str | None) -> PromptStage:
        """The prompt stage of the model a request names (None: the default one).

        Raises:
            UnknownModel: no such model is served (404, naming the served ones).
        """
        model = model or self.settings.default_model
        if model not in self.prompts:
            served = ", ".join(map(repr, self.prompts))
            raise UnknownModel(f"model {model!r} is not served here: the served models are {served} "
                               "(GET /v1/models); name one of them, or leave model out for the first")
        return self.prompts[model]

    def _check_limits(
        self, request: GenerateRequest, model: ServedModel, has_image: bool, has_mask: bool
    ) -> tuple[int, int]:
        native_width, native_height = model.native_size
        width, height = request.width or native_width, request.height or native_height
        problems = model.limit_problems(width, height, request.steps, request.num_images)
        s = self.settings
        if request.scheduler is not None and request.scheduler not in model.samplers:
            problems.append(f"scheduler {request.scheduler!r} is not available for model {model.name}: choose one of "
                            f"{', '.join(model.samplers)}")
        if has_mask and not has_image:
            problems.append("mask needs init_image: send the image to inpaint as well")
        if model.inpainting_only and not (has_image and has_mask):
            problems.append("this model is an inpainting model (its UNet takes the image and the mask): send "
                            "init_image and mask")
        if request.strength is not None and not has_image:
            problems.append("strength applies to init_image: send one, or leave strength out")
        if has_image:
            strength = request.strength or default_strength(has_mask)
            if int(request.steps * strength) < 1:
                problems.append(f"strength {strength:g} of {request.steps} steps runs no step: raise strength or "
                                f"steps (strength x steps >= 1)")
        if request.preview_every:
            if s.preview_every_steps == 0:
                problems.append("this deployment sends no previews (preview_every_steps 0): leave preview_every out "
                                "or set it to 0")
            elif request.preview_every < s.preview_every_steps:
                problems.append(f"preview_every {request.preview_every} is below the deployment's "
                                f"preview_every_steps {s.preview_every_steps}: ask for {s.preview_every_steps} or "
                                "more (fewer previews), or 0 for none")
        for field in ("prompt", "negative_prompt"):
            # Before tokenizing: the tokenizer's work grows with the text, the token limit is checked after it.
            if (chars := len(getattr(request, field))) > s.max_prompt_chars:
                problems.append(f"{field} is {chars} characters long, above the limit {s.max_prompt_chars}: shorten it")
        if problems:
            raise InvalidRequest("; ".join(problems))
        return width, height

    async def _check_memory(self, model: str, width: int, height: int, request: GenerateRequest) -> None:
        """Refuse a request that does not fit, even alone, the memory of every live worker of `model` that
        published its measurements (`service.memory`): any of them may take it. Without any published yet it is
        admitted, and the worker that takes it checks it again."""
        profiles = await self.queue.memory_profiles(model)
        for profile in sorted(profiles, key=lambda profile: profile.budget_bytes):
            if refusal := profile.refusal(width, height, request.num_images, request.guidance_scale):
                raise InsufficientMemory(refusal)

    def preview_spacing(self, steps: int, strength: float, partial_images: int) -> int:
        """Steps between previews that give at most `partial_images` of them before a job's image (OpenAI's
        streaming), never closer than the deployment's `preview_every_steps`; 0 = none.

        Args:
            steps (`int`): the request's steps.
            strength (`float`): the share of them that runs (1 without an image to start from).
            partial_images (`int`): previews wanted.
        """
        if partial_images == 0 or self.settings.preview_every_steps == 0:
            return 0
        steps_run = max(int(steps * strength), 1)
        spacing = max(self.settings.preview_every_steps, math.ceil(steps_run / (partial_images + 1)))
        return min(spacing, MAX_PREVIEW_EVERY)

    async def submit(self, request: GenerateRequest, files: Mapping[str, bytes] | None = None) -> JobState:
        """Validate against the model's limits and the workers' memory, decode and check the images, encode the
        prompts (which checks their token length), enqueue; the queued job's state.

        Args:
            request (`GenerateRequest`): the job.
            files (`Mapping[str, bytes] | None`): uploaded `init_image` and `mask` files (multipart), which take the
                place of the request's base64 fields.
        """
        files = dict(files or {})
        for field in ("init_image", "mask"):
            if field not in files and (value := getattr(request, field)) is not None:
                files[field] = decode_base64(value, field)
        has_image, has_mask = "init_image" in files, "mask" in files
        stage = self.stage(request.model)
        model = stage.model
        stage.check_adapters(request.loras)
        width, height = self._check_limits(request, model, has_image, has_mask)
        await self._check_memory(model.name, width, height, request)
        timings: dict[str, float] = {}
        edit: EditImages | None = None
        if has_image:
            started = time.perf_counter()
            edit = await asyncio.to_thread(
                prepare_edit, files["init_image"], files.get("mask"), (width, height), self.settings.max_input_pixels
            )
            timings["image_decode_s"] = time.perf_counter() - started
        await self.queue.admit(model.name)  # at the bound, answer 429 before the text encoder's work
        payload, timings["text_encode_s"] = await stage.encode(request.prompt, request.negative_prompt, request.loras)
        mode: JobMode = "inpaint" if has_mask else "image" if has_image else "text"
        spec = JobSpec(
            id=secrets.token_hex(12), model=model.name, width=width, height=height, steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            num_images=request.num_images, scheduler=request.scheduler or model.default_sampler, mode=mode,
            strength=(request.strength or default_strength(has_mask)) if has_image else 1.0,
            preview_every=self.settings.preview_every_steps if request.preview_every is None else request.preview_every,
            loras=request.loras,
        )
        metrics.JOBS_SUBMITTED.labels(model=model.name, mode=mode, scheduler=spec.scheduler).inc()
        edit_images = wire.encode_edit_images(edit) if edit is not None else b""
        return await self.queue.submit(spec, payload, timings, edit_images)

    async def generate(self, request: GenerateRequest, files: Mapping[str, bytes] | None = None) -> Generated:
        """Submit and wait up to the request timeout for the images."""
        submitted = await self.submit(request, files)
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

    def loras(self, model: str | None = None) -> list[LoRAEntry]:
        """The LoRA adapters requests to `model` (None: the default one) may name (`GET /v1/loras`)."""
        return [LoRAEntry(**vars(info)) for info in self.stage(model).loras.describe()]

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
        """Checks of `/readyz` (a live worker for every served model); raises `NotReady` naming the failing ones."""
        checks = {"text_encoder_loaded": bool(self.prompts)}
        for worker in self.workers:
            checks[f"embedded_worker_warm:{worker.model_name}"] = worker.ready
        try:
            await self.queue.ping()
            checks["queue_reachable"] = True
            for name in self.models:
                stats = await self.queue.stats(name)
                embedded = any(worker.ready and worker.model_name == name for worker in self.workers)
                checks[f"live_worker:{name}"] = stats.live_workers >= 1 or embedded
        except Exception:
            checks["queue_reachable"] = False
            checks.update({f"live_worker:{name}": False for name in self.models})
        failing = [name for name, ok in checks.items() if not ok]
        if failing:
            raise NotReady(f"not ready: {', '.join(failing)}", retry_after_s=self.settings.retry_after_s)
        return checks
