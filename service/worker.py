"""The worker: takes compatible jobs, runs them as one batched denoising loop, stores PNGs, acknowledges.

Every image has its own torch.Generator (seed + n), its own prompt-specific parameters and its own LoRA adapters
(side branches per batch row, `dgq_core.use_loras`: jobs with different adapters share a batch), and the UNet is
made batch-invariant (`dgq_core.make_batch_invariant`), so an image does not depend on what it was batched with. A batch
runs one mode (text-to-image, image-to-image, inpainting) with one sampler; jobs that asked for previews get one every
`preview_every` steps on their event stream (`service.previews`).

At warm-up the worker measures its memory on a few request shapes (`service.memory`) and publishes the fit; it
forms no batch beyond what that admits, and fails at once, with the figures, a job that would not fit even alone or
that breaks the model's limits (the API refuses both; a job written straight into Redis is checked here).

A batch that raises (out of memory, or one job that cannot run) is split in halves and each half retried, so a
job that fails even alone is the only one to fail: it goes to the dead letters with the reason. `stop()` drains:
no new jobs are taken, the ones held are finished and acknowledged, then `run` returns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

import dgq_core
from service import memory, metrics
from service.config import Settings
from service.errors import InsufficientMemory, InvalidRequest, QueueUnavailable
from service.images import EditImages
from service.previews import PreviewDecoder, decode_latents, denoised_estimates, png_bytes
from service.queue import wire
from service.queue.base import GENERATION_FAILED, JobQueue, QueuedJob, StoredImages
from service.schemas import MODEL_SCHEDULER, JobEvent, JobMode, JobSpec
from service.served_model import LOADING, ServedModel, component_weight_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

@dataclass
class BatchOutput:
    pngs: list[list[bytes]]
    """PNGs per job, in the order of the jobs."""
    denoise_s: float
    decode_s: float


@dataclass
class StepProgress:
    """What a batch's denoising loop reports after each step."""

    step: int
    """Steps done."""
    steps: int
    """Steps the loop runs: the request's steps, times `strength` for an edit."""
    seconds: float
    """The step's time (UNet calls and scheduler; not the previews)."""
    previews: dict[str, bytes] = field(default_factory=dict)
    """Job id -> PNG preview of its image 0, for the jobs due one at this step."""
    preview_s: float = 0.0
    """Time spent on those previews."""


class BatchRunner:
    """Runs a list of compatible jobs as one pipeline call (blocking; call it from a thread).

    Args:
        pipe (`DiffusionPipeline`): the worker's text-to-image pipeline (UNet, VAE, scheduler; no text encoder).
            Image-to-image and inpainting pipelines share its components.
        preview_decoder (`str`): how previews are decoded (`service.previews.choose_decoder`).
        loras (`dgq_core.LoRALibrary | None`): the adapters jobs may name (None: none).
    """

    def __init__(
        self, pipe: DiffusionPipeline, preview_decoder: str = "auto", loras: dgq_core.LoRALibrary | None = None
    ) -> None:
        self.pipe = pipe
        self.loras = loras or dgq_core.LoRALibrary(None, 0)
        self.previews = PreviewDecoder(pipe, preview_decoder)
        self._pipelines: dict[str, DiffusionPipeline] = {"text": pipe}
        self._schedulers = {MODEL_SCHEDULER: pipe.scheduler}
        self._model_scheduler_config = dict(pipe.scheduler.config)

    def pipeline(self, mode: JobMode) -> DiffusionPipeline:
        """The pipeline of a job mode, made on first use from the text-to-image one (shared components)."""
        if mode not in self._pipelines:
            auto = AutoPipelineForImage2Image if mode == "image" else AutoPipelineForInpainting
            pipeline = auto.from_pipe(self.pipe)
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[mode] = pipeline
        return self._pipelines[mode]

    def scheduler(self, name: str) -> SchedulerMixin:
        """The scheduler of a sampler name (`dgq_core.SAMPLERS`, or `MODEL_SCHEDULER`), made once: a worker runs
        one batch at a time, so one instance per sampler serves every batch."""
        if name not in self._schedulers:
            self._schedulers[name] = dgq_core.make_scheduler(name, self._model_scheduler_config)
        return self._schedulers[name]

    def run(self, jobs: list[QueuedJob], on_step: Callable[[StepProgress], bool]) -> BatchOutput:
        """`on_step(progress)` is called after each step; it returns True to stop the loop (all cancelled)."""
        spec = jobs[0].spec
        pipe = self.pipeline(spec.mode)
        pipe.scheduler = self.scheduler(spec.scheduler)
        rows = [(dgq_core.unpack_prompt_pair(job.payload), seed) for job in jobs for seed in job.spec.seeds]
        job_adapters = [[(self.loras.get(lora.name), lora.scale) for lora in job.spec.loras] for job in jobs]
        adapters = [job_adapters[index] for index, job in enumerate(jobs) for _ in job.spec.seeds]
        prompts = [prompt for (prompt, _), _ in rows]
        negatives = [negative for (_, negative), _ in rows]
        generators = [torch.Generator(self.pipe.unet.device).manual_seed(seed) for _, seed in rows]
        edits = [wire.decode_edit_images(job.edit_images) for job in jobs for _ in job.spec.seeds] \
            if spec.mode != "text" else []
        first_rows = list(itertools.accumulate(job.spec.num_images for job in jobs[:-1]))
        preview_rows = {  # job id -> (row of its image 0, steps between previews)
            job.spec.id: (row, job.spec.preview_every)
            for job, row in zip(jobs, [0, *first_rows], strict=True) if job.spec.preview_every
        }
        kwargs = {"width": spec.width, "height": spec.height}  # edits take the size of their (resized) image
        if spec.mode != "text":
            kwargs = {"image": [Image.fromarray(edit.image) for edit in edits], "strength": spec.strength}
        if spec.mode == "inpaint":
            kwargs["mask_image"] = [Image.fromarray(edit.mask) for edit in edits]

        # the sampler's x0 predictions, when some job wants previews
        estimates = denoised_estimates(pipe.scheduler) if preview_rows else contextlib.nullcontext(lambda: None)
        last_step = time.perf_counter()

        def step_end(pipe: DiffusionPipeline, step: int, timestep: object, tensors: dict) -> dict:
            nonlocal last_step
            progress = StepProgress(step + 1, pipe.num_timesteps, time.perf_counter() - last_step)
            due = [(job_id, row) for job_id, (row, every) in preview_rows.items()
                   if progress.step % every == 0 and progress.step < progress.steps]
            if due:
                started = time.perf_counter()
                estimate = denoised()
                latents = estimate if estimate is not None else tensors["latents"]
                pngs = self.previews.pngs(latents[[row for _, row in due]])
                progress.previews = {job_id: png for (job_id, _), png in zip(due, pngs, strict=True)}
                progress.preview_s = time.perf_counter() - started
            if on_step(progress):
                pipe._interrupt = True
            last_step = time.perf_counter()
            return {}

        started = time.perf_counter()
        with (
            torch.inference_mode(),
            dgq_core.conditioning(pipe, prompts, negatives, spec.guidance_scale, adapters) as text,
            estimates as denoised,
        ):
            latents = pipe(
                **text, **kwargs, generator=generators, num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale, output_type="latent", callback_on_step_end=step_end,
            ).images
        decode_started = time.perf_counter()
        pngs = [self._png(latents[row : row + 1], edits[row] if edits else None) for row in range(len(rows))]
        done = time.perf_counter()
        per_job, start = [], 0
        for job in jobs:
            per_job.append(pngs[start : start + job.spec.num_images])
            start += job.spec.num_images
        return BatchOutput(pngs=per_job, denoise_s=decode_started - started, decode_s=done - decode_started)

    @torch.inference_mode()
    def _png(self, latent: torch.Tensor, edit: EditImages | None) -> bytes:
        """One latent -> PNG bytes (one at a time: VAE convolutions round differently at batch 1 vs > 1); an
        inpainted image keeps the original's pixels outside its mask."""
        [image] = decode_latents(self.pipe, latent)
        if edit is not None and edit.mask is not None:
            pixels = np.asarray(image).copy()
            keep = edit.mask == 0
            pixels[keep] = edit.image[keep]
            image = Image.fromarray(pixels)
        return png_bytes(image)


def compatible_batches(
    jobs: list[QueuedJob], max_images: int, images_that_fit: Callable[[JobSpec], int] | None = None
) -> list[list[QueuedJob]]:
    """Split `jobs` (in order) into batches of equal `batch_key` with at most `max_images` images each, and at most
    `images_that_fit(spec)` (the memory's bound for that size; a job above it alone is a batch of its own)."""
    batches: list[list[QueuedJob]] = []
    open_batches: dict[str, list[QueuedJob]] = {}
    for job in jobs:
        batch = open_batches.get(job.spec.batch_key)
        most = min(max_images, images_that_fit(job.spec)) if images_that_fit else max_images
        if batch is None or sum(j.spec.num_images for j in batch) + job.spec.num_images > most:
            batch = []
            batches.append(batch)
            open_batches[job.spec.batch_key] = batch
        batch.append(job)
    return batches


CPU_ALLOCATION_FAILURE = "DefaultCPUAllocator: can't allocate memory"
"""How torch's CPU allocator words a failed allocation: a plain RuntimeError, where CUDA raises OutOfMemoryError."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure (CUDA, the CPU allocator, or Python's own)."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and CPU_ALLOCATION_FAILURE in str(error)
    )


def failure_reason(job: QueuedJob, error: BaseException, profile: memory.MemoryProfile | None) -> str:
    """What a user reads when `job` failed on its own with `error`, and what to change. An allocation failure is
    told in the worker's measured figures, without the allocator's text (it is in the worker's log)."""
    spec = job.spec
    if not is_out_of_memory(error):
        return f"generation failed: {error!r}"
    what = f"{spec.num_images} image(s) of {spec.width}x{spec.height}"
    if profile is None:
        return f"out of memory running this job alone ({what}): ask for fewer images or a smaller size"
    need = profile.request_bytes(spec.width, spec.height, spec.num_images, spec.guidance_scale)
    return (
        f"out of memory running this job alone ({what}), although by this worker's measurements it needs about "
        f"{need / memory.MIB:.0f} MiB of the {profile.budget_bytes / memory.MIB:.0f} MiB it has for requests "
        "(something else holds memory now): ask for fewer images or a smaller size, or retry later"
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Loads one served model's pipeline, warms up, then loops: take that model's jobs, batch, run, store,
    acknowledge.

    Args:
        settings (`Settings`): the deployment's settings.
        queue (`JobQueue`): where the jobs come from.
        model (`ServedModel | None`): the model it serves; None = `settings.worker_model_name`, loaded by `load`.
        pipe (`DiffusionPipeline | None`): the model's worker pipeline, if already loaded.
    """

    def __init__(
        self, settings: Settings, queue: JobQueue, model: ServedModel | None = None, pipe: DiffusionPipeline | None = None
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.model_name = model.name if model is not None else settings.worker_model_name
        self.worker_id = settings.worker_id or default_worker_id()
        self.ready = False
        self.memory_profile: memory.MemoryProfile | None = None
        """What this worker's memory admits, measured at warm-up; None without a warm-up (`warmup_steps` 0)."""
        self.model = model
        self._pipe = pipe
        self._held: list[QueuedJob] = []
        self._cancel_requested: set[str] = set()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Drain: take no more jobs; `run` returns once the jobs already taken have ended."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called."""
        return self._stopping.is_set()

    async def load(self) -> None:
        """Load the UNet and VAE (unless given) and run the warm-up batch; `ready` is True afterwards."""
        started = time.perf_counter()
        await asyncio.to_thread(self._load_pipeline)
        name = self.model_name
        metrics.register_model(name)
        metrics.MODEL_LOAD.labels(model=name, stage="worker_load").set(time.perf_counter() - started)
        for component, precision, size in component_weight_bytes(self._pipe):
            metrics.MODEL_WEIGHT_BYTES.labels(model=name, component=component, precision=precision).set(size)
        metrics.MODEL_INFO.labels(model=name).info({
            "source": str(self.model.source.model), **self.model.quantization_info(),
            "quantized": str(self.model.source.quantized),
            **dgq_core.int_execution_summary(self._pipe.unet), "device": self.settings.device,
        })
        started = time.perf_counter()
        await asyncio.to_thread(self._warm_up)
        metrics.MODEL_LOAD.labels(model=name, stage="warmup").set(time.perf_counter() - started)
        self.ready = True

    def _load_pipeline(self) -> None:
        """The model, its pipeline (unless given) and the batch runner (its preview decoder is a torch module)."""
        with LOADING:
            if self.model is None:
                self.model = ServedModel(self.settings, self.model_name)
            if self._pipe is None:
                self._pipe = self.model.load_worker_pipeline()
            self.runner = BatchRunner(
                self._pipe, self.settings.preview_decoder, self.model.lora_library(self._pipe.unet.device)
            )

    def _warm_up(self) -> None:
        """Run the memory probes (the first one with `warmup_steps` steps, warming the caches), fit this worker's
        `memory_profile`, and warm the preview decoder."""
        if self.settings.warmup_steps == 0:
            log.warning("no warm-up (warmup_steps 0): no memory measurements, so no admission by memory")
            return
        limits, unet = self.model.limits, self._pipe.unet
        steps = iter([self.settings.warmup_steps])  # then 1 step per probe: every step peaks alike
        self.memory_profile = memory.measure_profile(
            self.worker_id, unet.device,
            memory.probe_shapes(self.model.native_size, limits, min(self.settings.max_batch, limits.max_num_images)),
            lambda width, height, images: self._denoise_zeros(width, height, images, next(steps, 1)),
            lambda latent: decode_latents(self._pipe, latent), dgq_core.scores_footprint(unet),
            self._pipe.vae_scale_factor, self.settings.request_memory_mb,
        )
        if self.settings.preview_every_steps:
            width, height = self.model.native_size
            scale, channels = self._pipe.vae_scale_factor, self._pipe.vae.config.latent_channels
            self.runner.previews.pngs(torch.zeros(1, channels, height // scale, width // scale, device=unet.device))

    def _denoise_zeros(self, width: int, height: int, images: int, steps: int) -> torch.Tensor:
        """The latents of `images` images of zero prompt embeddings, with guidance (a warm-up or memory probe)."""
        unet_config, device = self._pipe.unet.config, self._pipe.unet.device
        embeds = torch.zeros(images, self.model.prompt_tokens, unet_config.cross_attention_dim, device=device)
        text_inputs = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds}
        if unet_config.addition_embed_type == "text_time":
            # SDXL: the pooled text embedding and 6 size/crop ids share the added embedding's input
            pooled_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
            pooled = torch.zeros(images, pooled_dim, device=device)
            text_inputs |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": pooled}
        if unet_config.in_channels == 9:  # an inpainting UNet runs only with an image and a mask
            text_inputs |= {"image": Image.new("RGB", (width, height)), "mask_image": Image.new("L", (width, height), 255)}
        with torch.inference_mode():
            return self._pipe(
                **text_inputs, num_inference_steps=steps, width=width, height=height, output_type="latent",
            ).images

    def _refusal(self, spec: JobSpec) -> tuple[str, str] | None:
        """(reason, error type) when a job is for another model, breaks the model's limits or does not fit this
        worker's memory alone."""
        if spec.model != self.model_name:  # only a job written straight into the stream can be
            return f"job for model {spec.model!r} reached a worker of model {self.model_name!r}", InvalidRequest.__name__
        if problems := self.model.limit_problems(spec.width, spec.height, spec.steps, spec.num_images):
            return "; ".join(problems), InvalidRequest.__name__
        profile = self.memory_profile
        if profile and (refusal := profile.refusal(spec.width, spec.height, spec.num_images, spec.guidance_scale)):
            return refusal, InsufficientMemory.__name__
        return None

    def _images_that_fit(self, spec: JobSpec) -> int:
        if self.memory_profile is None:
            return self.settings.max_batch
        return self.memory_profile.images_that_fit(spec.width, spec.height, spec.guidance_scale,
                                                   self.settings.max_batch)

    async def run(self) -> None:
        """Serve jobs until `stop()` (returns after the drain) or cancellation, with a heartbeat task alongside."""
        if not self.ready:
            await self.load()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        last_reap = 0.0
        try:
            # a take already waiting when stop() comes is let finish (at most READ_BLOCK_MS): cancelling it could
            # lose entries Redis delivered to this worker, which would then wait for the reaper
            while not self._stopping.is_set():
                jobs: list[QueuedJob] = []
                if time.monotonic() - last_reap > self.settings.reaper_interval_s:
                    last_reap = time.monotonic()
                    jobs = await self._guarded(self.queue.reap(self.worker_id, self.model_name), [])
                    metrics.JOBS_RECLAIMED.labels(model=self.model_name).inc(len(jobs))
                if not jobs:
                    jobs = await self._guarded(self.queue.take(
                        self.worker_id, self.model_name, self.settings.max_batch, self.settings.batch_window_s
                    ), [])
                self._held = list(jobs)  # heartbeats keep every taken job ours until its batch has run
                runnable = []
                for job in jobs:
                    if refusal := self._refusal(job.spec):
                        await self._guarded(self.queue.dead_letter(job, *refusal), None)
                        self._held.remove(job)
                    else:
                        runnable.append(job)
                for batch in compatible_batches(runnable, self.settings.max_batch, self._images_that_fit):
                    # on a Redis outage mid-batch the jobs stay pending and are reclaimed once it is back
                    await self._guarded(self._run_batch(batch), None)
                    ran = {job.spec.id for job in batch}
                    self._held = [job for job in self._held if job.spec.id not in ran]
        finally:
            heartbeat.cancel()

    async def _guarded(self, call: Awaitable[T], fallback: T) -> T:
        """Await a queue call; while the backend is unreachable, log, wait and return `fallback`."""
        try:
            return await call
        except QueueUnavailable as error:
            log.warning("queue unavailable, retrying: %s", error)
            await asyncio.sleep(self.settings.retry_after_s)
            return fallback

    async def _heartbeat_loop(self) -> None:
        while True:
            held = list(self._held)
            await self._guarded(self.queue.heartbeat(self.worker_id, self.model_name, held), None)
            if self.memory_profile is not None:
                await self._guarded(self.queue.publish_memory_profile(self.model_name, self.memory_profile), None)
            if held:
                self._cancel_requested = await self._guarded(
                    self.queue.cancel_requested([job.spec.id for job in held]), set()
                )
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _run_batch(self, jobs: list[QueuedJob]) -> None:
        started = [job for job in jobs if await self.queue.start(job, self.worker_id)]
        if not started:
            return
        start_time = time.time()
        for job in started:
            metrics.QUEUE_WAIT.labels(model=self.model_name).observe(start_time - job.spec.created_at)
        await self._run_started(started, start_time)

    async def _run_started(self, started: list[QueuedJob], start_time: float) -> None:
        """Run started jobs as one batch and store the outcome; if the batch raises, retry it in halves."""
        loop = asyncio.get_running_loop()
        ids = {job.spec.id for job in started}
        name = self.model_name

        def on_step(progress: StepProgress) -> bool:
            metrics.DENOISE_STEP.labels(model=name).observe(progress.seconds)
            event = JobEvent(event="step", data={"step": progress.step, "steps": progress.steps})
            for job in started:
                asyncio.run_coroutine_threadsafe(self.queue.publish(job.spec.id, event), loop)
            for job_id, png in progress.previews.items():
                metrics.PREVIEW_DECODE.labels(model=name).observe(progress.preview_s / len(progress.previews))
                preview = JobEvent(event="preview", data={
                    "step": progress.step, "steps": progress.steps, "image": base64.b64encode(png).decode(),
                })
                asyncio.run_coroutine_threadsafe(self.queue.publish(job_id, preview), loop)
            return ids <= self._cancel_requested

        images_in_batch = sum(job.spec.num_images for job in started)
        metrics.BATCH_SIZE.labels(model=name).observe(images_in_batch)
        try:
            output = await asyncio.to_thread(self.runner.run, started, on_step)
        except Exception as error:  # never drops a job: its batch is retried in halves, or it fails with a reason
            out_of_memory = is_out_of_memory(error)
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the halves the cached blocks of the failed attempt
            if len(started) > 1:
                log.warning("batch of %d jobs (%d images) failed with %r; retrying it in halves", len(started),
                            images_in_batch, error)
                half = len(started) // 2
                for part in (started[:half], started[half:]):
                    await self._run_started(part, start_time)
                return
            [job] = started
            log.exception("job %s failed on its own", job.spec.id)
            error_type = InsufficientMemory.__name__ if out_of_memory else GENERATION_FAILED
            await self.queue.dead_letter(job, failure_reason(job, error, self.memory_profile), error_type)
            return
        metrics.DENOISE.labels(model=name).observe(output.denoise_s)
        metrics.DECODE.labels(model=name).observe(output.decode_s)
        cancelled = self._cancel_requested | await self.queue.cancel_requested(list(ids))
        for job, pngs in zip(started, output.pngs, strict=True):
            if job.spec.id in cancelled:
                await self.queue.finish_cancelled(job)
                metrics.JOBS.labels(model=name, outcome="cancelled").inc()
                continue
            timings = {
                "queue_wait_s": start_time - job.spec.created_at, "denoise_s": output.denoise_s,
                "decode_s": output.decode_s, "batch_images": float(images_in_batch),
                "total_s": time.time() - job.spec.created_at,
            }
            await self.queue.succeed(job, StoredImages(pngs=pngs, timings=timings))
            metrics.JOBS.labels(model=name, outcome="succeeded").inc()
