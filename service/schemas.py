"""The protocol: request and response bodies of the HTTP API and the job records that cross processes.

Static bounds live here (pydantic answers 422 with the field and what to change); limits that depend on the
deployment (largest size, prompt token length) are checked in `service.serving` against `Settings`.
"""

from __future__ import annotations

import enum
import json
import re
import time
from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

import dgq_core

SIZE_MULTIPLE = 8
"""Image sides must be multiples of this (the VAE downsamples by 8)."""

MODEL_SCHEDULER = "model-default"
"""The scheduler a job runs when the request names none and the model's own is none of `dgq_core.SAMPLERS`."""

SamplerName = Literal[tuple(dgq_core.SAMPLERS)]
"""A sampler a request may name; which of them a model runs is its `samplers` list (`/v1/models`)."""

JobMode = Literal["text", "image", "inpaint"]
"""text-to-image, image-to-image (`init_image`), inpainting (`init_image` + `mask`)."""

MAX_PREVIEW_EVERY = 1000
PARTIAL_IMAGES_MAX = 3
"""OpenAI's bound on `partial_images`."""

_IMAGE_HELP = (
    "PNG, JPEG or WebP of at most `max_input_pixels` pixels (`/playground/info`; the body at most "
    "`max_upload_bytes`), resized to the output size."
)
_MASK_HELP = (
    "Inpainting mask of `init_image`'s size (PNG): where it is transparent (OpenAI's convention) or, for a mask "
    "without transparency, white, the image is redrawn; elsewhere it is kept."
)


MAX_LORAS_PER_REQUEST = 4
"""Most LoRA adapters one request may name."""
LORA_SCALE_BOUND = 2.0
"""A LoRA's `scale` lies in [-bound, bound]: beyond it an adapter only distorts the image."""


class LoRARequest(BaseModel):
    """One LoRA adapter a request applies (`GET /v1/loras` lists them)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=dgq_core.LORA_NAME_PATTERN.pattern,
                      description="The adapter's name (`GET /v1/loras`).")
    scale: float = Field(1.0, ge=-LORA_SCALE_BOUND, le=LORA_SCALE_BOUND,
                         description="Its strength: 1 = as trained, 0 = off, negative = away from its style.")


LoRAList = Annotated[
    list[LoRARequest],
    Field(max_length=MAX_LORAS_PER_REQUEST, description="LoRA adapters to apply, each with its scale; each name at "
          f"most once, at most {MAX_LORAS_PER_REQUEST}. Empty = the plain model."),
]


def _unique_loras(loras: list[LoRARequest]) -> list[LoRARequest]:
    names = [lora.name for lora in loras]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"each adapter at most once: {', '.join(duplicates)} appears more than once (sum the scales)")
    return loras


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
    model: str | None = Field(None, description="The model to run (`GET /v1/models`); None = the served one.")
    loras: LoRAList = Field(default_factory=list)
    width: int | None = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE, description="None = model native.")
    height: int | None = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE, description="None = model native.")
    steps: int = Field(20, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, description="Classifier-free guidance; 1 = none.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Image n uses seed + n; None = random.")
    num_images: int = Field(1, ge=1, description="Images for this prompt, each with its own seed.")
    scheduler: SamplerName | None = Field(
        None, description="The sampler; None = the model's own. Which ones a model runs: `/v1/models`."
    )
    init_image: str | None = Field(
        None, description="Image to start from (image-to-image), base64 (a data URL too). " + _IMAGE_HELP
    )
    mask: str | None = Field(None, description=_MASK_HELP + " Base64; needs `init_image`.")
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="How much of `init_image` is redrawn (the share of the steps run); "
        "None = 0.8, or 1.0 with a mask.",
    )
    preview_every: int | None = Field(
        None, ge=0, le=MAX_PREVIEW_EVERY, description="A `preview` event with a small image on the job's event "
        "stream every this many steps; at least the deployment's `preview_every_steps` (fewer previews), 0 = none, "
        "None = the deployment's.",
    )
    respond_async: bool = Field(
        False, alias="async", description="Answer 202 with a job id at once instead of waiting for the images."
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form_text(cls, loras: object) -> object:
        """A multipart form carries `loras` as JSON text."""
        if isinstance(loras, str):
            try:
                return json.loads(loras)
            except ValueError as error:
                raise ValueError('loras must be a JSON list, e.g. [{"name": "outlined", "scale": 1.0}]') from error
        return loras

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, loras: list[LoRARequest]) -> list[LoRARequest]:
        return _unique_loras(loras)


class GenerateForm(GenerateRequest):
    """`POST /generate` as multipart/form-data: the fields of the JSON body, with the images as file uploads."""

    init_image: UploadFile | None = Field(None, description="Image to start from (image-to-image). " + _IMAGE_HELP)
    mask: UploadFile | None = Field(None, description=_MASK_HELP)


class OpenAIImageRequest(BaseModel):
    """Body of the OpenAI-compatible `POST /v1/images/generations`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "512x512"; None or "auto" = model native.')
    response_format: Literal["b64_json", "url"] = "b64_json"
    stream: bool = Field(False, description="Answer with server-sent events: `partial_images` previews, then the "
                         "images (OpenAI's streaming images API).")
    partial_images: int = Field(0, ge=0, le=PARTIAL_IMAGES_MAX, description="Previews to stream before the image.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0)
    scheduler: SamplerName | None = Field(None, description="The sampler; None = the model's own.")
    loras: LoRAList = Field(default_factory=list)

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, loras: list[LoRARequest]) -> list[LoRARequest]:
        return _unique_loras(loras)

    @field_validator("size")
    @classmethod
    def _size_is_width_x_height(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return None
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if not match or any(int(side) % SIZE_MULTIPLE or int(side) < SIZE_MULTIPLE for side in match.groups()):
            raise ValueError(f'size must be "WIDTHxHEIGHT" with both sides multiples of {SIZE_MULTIPLE}, e.g. "512x512"')
        return size

    def to_generate_request(self, preview_every: int = 0) -> GenerateRequest:
        """The same job as a `POST /generate` body.

        Args:
            preview_every (`int`): steps between previews (0 = none), from `partial_images`.
        """
        width, height = (int(side) for side in self.size.split("x")) if self.size else (None, None)
        return GenerateRequest(
            prompt=self.prompt, model=self.model, loras=self.loras, width=width, height=height, steps=self.steps,
            guidance_scale=self.guidance_scale, seed=self.seed, num_images=self.n, scheduler=self.scheduler,
            preview_every=preview_every,
            **self._edit_fields(),
        )

    def _edit_fields(self) -> dict[str, object]:
        return {}


class OpenAIImageEditRequest(OpenAIImageRequest):
    """Body of the OpenAI-compatible `POST /v1/images/edits` (multipart/form-data): one image, an optional mask."""

    image: UploadFile = Field(description="The image to edit (PNG, JPEG or WebP).")
    mask: UploadFile | None = Field(None, description="PNG of the image's size whose transparent pixels mark where "
                                    "to edit; without it the whole image is redrawn (image-to-image).")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="How much is redrawn; None = 0.8, or 1.0 with "
                                   "a mask.")

    def _edit_fields(self) -> dict[str, object]:
        return {"strength": self.strength}


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
    model: str = Field(description="The served model that runs it (its name); the job goes to that model's queue.")
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    mode: JobMode = "text"
    strength: float = Field(1.0, gt=0.0, le=1.0, description="Share of the steps run (image modes).")
    preview_every: int = Field(0, ge=0, description="Steps between previews of image 0; 0 = none.")
    loras: list[LoRARequest] = Field(
        default_factory=list, description="The job's LoRA adapters; jobs with different ones share a batch (each row "
        "runs its own)."
    )
    created_at: float = Field(default_factory=time.time)

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can share one denoising loop: every UNet call of the loop takes all their rows, so
        they need the same size, timesteps (steps, sampler, strength) and pipeline (mode); previews do not matter."""
        key = f"{self.width}x{self.height}/{self.steps}/{self.guidance_scale}/{self.scheduler}/{self.mode}"
        return key if self.mode == "text" else f"{key}/{self.strength}"

    @property
    def seeds(self) -> list[int]:
        return [self.seed + n for n in range(self.num_images)]


class JobState(BaseModel):
    """What the API knows about a job (`GET /jobs/{id}`)."""

    id: str
    model: str = Field(description="The model that runs it.")
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

    event: str = Field(description="queued | started | step | preview | succeeded | failed | cancelled; a preview's "
                       "data: step, steps, image (base64 PNG of image 0, at most 256 px a side)")
    data: dict[str, object] = Field(default_factory=dict)


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ModelQuantization(BaseModel):
    """How a served model's UNet is quantized and run."""

    quant_method: str = Field(description="'dgq', another method, or 'none' (full precision).")
    bits: str = Field(description="Weight and activation bits, e.g. 'W8A8'; 'fp' for full precision.")
    prob_quantizer: str = Field(description="Codes of the attention probabilities (e.g. 'log2', 'log_sqrt2'); "
                                "'none' when they are not quantized.")
    exec_mode: str = Field(description="'auto', 'int' or 'fake' (`DGQ_EXEC_MODE`); 'none' for full precision.")


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "dgq-serve"
    default: bool = Field(False, description="Whether a request without `model` runs this one.")
    quantization: ModelQuantization
    native_width: int = Field(description="Image width when a request gives none.")
    native_height: int = Field(description="Image height when a request gives none.")
    limits: ModelLimits
    samplers: list[str] = Field(default_factory=list, description="What `scheduler` may name for this model.")
    default_sampler: str = Field(MODEL_SCHEDULER, description="The sampler a request without `scheduler` runs.")


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


class LoRAEntry(BaseModel):
    """One adapter of `GET /v1/loras`."""

    name: str = Field(description="What `loras[].name` calls it.")
    rank: int = Field(description="Its largest rank.")
    targets: list[str] = Field(description="The UNet layers it targets (diffusers module names; kohya's with "
                               "underscores for the dots).")
    bytes: int = Field(description="Size of its weights.")
    description: dict[str, object] = Field(default_factory=dict, description="Its JSON description, if it has "
                                           "one (e.g. its trigger word and how it was trained).")


class LoRAListing(BaseModel):
    object: str = "list"
    data: list[LoRAEntry]


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
