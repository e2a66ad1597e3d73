"""The protocol: request and response bodies of the HTTP API and the job records that cross processes.

Static bounds live here (pydantic answers 422 with the field and what to change); limits that depend on the
deployment (largest size, prompt token length) are checked in `service.serving` against `Settings`.
"""

from __future__ import annotations

import enum
import re
import time

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIZE_MULTIPLE = 8
"""Image sides must be multiples of this (the VAE downsamples by 8)."""


class JobStatus(enum.StrEnum):
    """Where a job is; the last three are terminal and every job reaches one of them."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class GenerateRequest(BaseModel):
    """Body of `POST /generate`."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    negative_prompt: str = Field("", description="What to steer away from (classifier-free guidance).")
    width: int | None = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE, description="None = model native.")
    height: int | None = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE, description="None = model native.")
    steps: int = Field(20, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, description="Classifier-free guidance; 1 = none.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Image n uses seed + n; None = random.")
    num_images: int = Field(1, ge=1, description="Images for this prompt, each with its own seed.")
    respond_async: bool = Field(
        False, alias="async", description="Answer 202 with a job id at once instead of waiting for the images."
    )


class OpenAIImageRequest(BaseModel):
    """Body of the OpenAI-compatible `POST /v1/images/generations`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "512x512"; None = model native.')
    response_format: str = Field("b64_json", pattern="^(b64_json|url)$")
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0)

    @field_validator("size")
    @classmethod
    def _size_is_width_x_height(cls, size: str | None) -> str | None:
        if size is None:
            return None
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if not match or any(int(side) % SIZE_MULTIPLE or int(side) < SIZE_MULTIPLE for side in match.groups()):
            raise ValueError(f'size must be "WIDTHxHEIGHT" with both sides multiples of {SIZE_MULTIPLE}, e.g. "512x512"')
        return size

    def to_generate_request(self) -> GenerateRequest:
        width, height = (int(side) for side in self.size.split("x")) if self.size else (None, None)
        return GenerateRequest(
            prompt=self.prompt, width=width, height=height, steps=self.steps, guidance_scale=self.guidance_scale,
            seed=self.seed, num_images=self.n,
        )


class ModelLimits(BaseModel):
    """What one request to a model may ask for (`GET /v1/models`, `/playground/info`); larger requests get 422."""

    max_width: int = Field(description="Largest width (a multiple of 8).")
    max_height: int = Field(description="Largest height (a multiple of 8).")
    max_pixels: int = Field(description="Largest width x height.")
    max_steps: int = Field(description="Most denoising steps.")
    max_num_images: int = Field(description="Most images per request.")


class JobSpec(BaseModel):
    """Everything a worker needs besides the tensors; crosses processes as JSON."""

    id: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    created_at: float = Field(default_factory=time.time)

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can share one denoising loop."""
        return f"{self.width}x{self.height}/{self.steps}/{self.guidance_scale}/{self.scheduler}"

    @property
    def seeds(self) -> list[int]:
        return [self.seed + n for n in range(self.num_images)]


class JobState(BaseModel):
    """What the API knows about a job (`GET /jobs/{id}`)."""

    id: str
    status: JobStatus
    position: int | None = Field(None, description="Jobs ahead of this one; 0 = next; None once it runs.")
    num_images: int
    seeds: list[int] = Field(description="Seed of each image (image n uses seed + n).")
    images: list[str] = Field(default_factory=list, description="URLs of the images once succeeded.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    error: str | None = None
    error_type: str | None = Field(
        None, description="What kind of failure: the error type a synchronous request answers with "
        "(InsufficientMemory: the job did not fit the worker's memory; GenerationFailed otherwise).",
    )
    worker: str | None = None
    deliveries: int = Field(0, description="How many times a worker took this job (> 1 after a worker died).")
    created_at: float
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="When the images are deleted (unix time).")

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.time() >= self.expires_at


class JobAccepted(BaseModel):
    """Body of a 202 answer."""

    id: str
    status: JobStatus
    location: str


class GeneratedImages(BaseModel):
    """Body of `POST /generate` when several images were asked for."""

    id: str
    seeds: list[int]
    images: list[str] = Field(description="Base64 PNGs.")
    timings: dict[str, float]


class JobEvent(BaseModel):
    """One server-sent event of `GET /jobs/{id}/events`."""

    event: str = Field(description="queued | started | step | succeeded | failed | cancelled")
    data: dict[str, object] = Field(default_factory=dict)


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "dgq-serve"
    native_width: int = Field(description="Image width when a request gives none.")
    native_height: int = Field(description="Image height when a request gives none.")
    limits: ModelLimits


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


class ErrorDetail(BaseModel):
    """The OpenAI error shape, so OpenAI clients show the message."""

    message: str
    type: str
    code: int


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: what is wrong and how to fix it."""

    detail: str
    type: str
    job_id: str | None = None
    error: ErrorDetail

    @classmethod
    def of(cls, status: int, message: str, error_type: str, job_id: str | None = None) -> ErrorBody:
        return cls(detail=message, type=error_type, job_id=job_id,
                   error=ErrorDetail(message=message, type=error_type, code=status))
