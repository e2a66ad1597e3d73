"""One `Settings` object for the API and the workers, read from the environment (`DGQ_*`) and the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.auth import HASH_HELP, is_key_hash

BUNDLED_MODEL = "bundled"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""What a name in `Settings.models` may be: it becomes part of Redis keys, metric labels and URLs."""


class ModelSource(BaseModel):
    """Where one served model comes from (an entry of `Settings.models`, or the single model that `model`,
    `quantized` and `lora_dir` name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(BUNDLED_MODEL, description="Diffusers model dir or hub id; 'bundled' = the model in dgq_zoo.")
    quantized: str | None = Field(
        "auto", description="Quantized checkpoint dir to put into `model`; 'auto' = the model dir's own if it is "
        "quantized, else quantize at the first start and cache; 'none' = serve `model` as it is.",
    )
    lora_dir: str | None = Field(
        None, description="Directory of the LoRA adapters requests to this model may name; None = the bundled "
        "model's example adapters when `model` is the bundled model, else none.",
    )

    @property
    def model_ref(self) -> str | Path:
        """The model to load: a path for the bundled model, else what was configured."""
        if self.model == BUNDLED_MODEL:
            from dgq_zoo import bundled_model_dir

            return bundled_model_dir()
        return self.model

    @property
    def lora_path(self) -> Path | None:
        """The adapters' directory: `lora_dir`, else the bundled model's example adapters when it is served."""
        if self.lora_dir:
            return Path(self.lora_dir).expanduser()
        if self.model == BUNDLED_MODEL:
            from dgq_zoo import bundled_lora_dir

            return bundled_lora_dir()
        return None


class ModelLimitSettings(BaseModel):
    """The request limits set for one model (`Settings.model_limits`); a limit left out keeps the default the
    served model derives from its native size (`service.served_model.ServedModel.limits`)."""

    model_config = ConfigDict(extra="forbid")

    max_width: int | None = Field(None, ge=8, multiple_of=8, description="Largest width (a multiple of 8).")
    max_height: int | None = Field(None, ge=8, multiple_of=8, description="Largest height (a multiple of 8).")
    max_pixels: int | None = Field(None, ge=64, description="Largest width x height.")
    max_steps: int | None = Field(None, ge=1, description="Most denoising steps.")
    max_num_images: int | None = Field(None, ge=1, description="Most images per request.")


class Settings(BaseSettings):
    """Everything a `dgq-serve` or `dgq-worker` process can be told.

    Environment variables are the field names upper-cased with the `DGQ_` prefix (`DGQ_MAX_BATCH=8`);
    `REDIS_URL` is also read without the prefix. On the command line they are `--max_batch 8` etc.
    """

    # hide_input_in_errors: a refused setting must not echo a key or a REDIS_URL password into a startup log.
    model_config = SettingsConfigDict(
        env_prefix="DGQ_", env_file=".env", extra="ignore", validate_assignment=True, hide_input_in_errors=True
    )

    # --- model(s) ---
    models: dict[str, ModelSource] = Field(
        default_factory=dict,
        description="Several models behind one API, as JSON: name -> {model, quantized, lora_dir}, e.g. "
        '{"shapes": {"model": "bundled"}, "shapes-fp": {"model": "bundled", "quantized": "none"}}. A request picks '
        "one by `model`; one without `model` gets the first. Each model has its own job stream and workers "
        "(`worker_model`). Empty = the one model that `model`, `quantized` and `lora_dir` name, called by `model`.",
    )
    worker_model: str | None = Field(
        None, description="The model (a name of `models`) a dgq-worker serves; None = the only one. Each model's "
        "workers are scaled on their own.",
    )
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Directories local models and quantized checkpoints must lie in (comma-separated); a `model` or "
        "`quantized` path elsewhere is refused at startup. Empty = any directory. Hub ids, the bundled model and "
        "the checkpoints quantized='auto' makes are always allowed.",
    )
    model: str = Field(BUNDLED_MODEL, description="Diffusers model dir or hub id; 'bundled' = the model in dgq_zoo "
                       "(without `models`).")
    quantized: str | None = Field(
        "auto",
        description="Quantized checkpoint dir to put into `model`; 'auto' = the model dir's own if it is quantized, "
        "else quantize at the first start and cache; 'none' = serve `model` as it is (without `models`).",
    )
    quantized_cache_dir: str = Field("~/.cache/dgq-serve", description="Where quantized='auto' keeps checkpoints.")
    exec_mode: Literal["auto", "fake", "int"] = Field(
        "auto",
        description="DGQ execution: 'auto' (integer kernels for the large layers on CPUs with VNNI, fake quantization for "
        "small ones and elsewhere), "
        "'int' (integer kernels everywhere) or 'fake' (quantize-dequantize in floating point).",
    )
    device: str = Field("cpu", description="Torch device for the workers' UNet and VAE, e.g. 'cuda:0'.")
    default_width: int | None = Field(None, description="Image width when a request gives none; None = model native.")
    default_height: int | None = Field(None, description="Image height when a request gives none; None = model native.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads torch may use; None = torch's default.")
    warmup_steps: int = Field(2, ge=0, description="Denoising steps of the warm-up run a worker does before taking jobs.")
    preview_every_steps: int = Field(
        4, ge=0, description="A worker decodes a small preview of a job's image every this many denoising steps "
        "(a request may ask for fewer, `preview_every`); 0 = no previews.",
    )
    preview_decoder: Literal["auto", "vae", "taesd"] = Field(
        "auto", description="How previews are decoded: 'vae' (the model's own VAE), 'taesd' (the tiny TAESD decoder "
        "shipped in service/assets, for SD 1.x/2.x latents) or 'auto' (the VAE when it is small, as the bundled "
        "model's, else TAESD for SD 1.x/2.x latents, else the VAE).",
    )
    attention_budget_mb: int = Field(
        256, ge=1, description="Largest attention-score block (MiB, float32) one call of the quantized UNet's "
        "attention materializes; larger images run their attention in blocks of query rows (same images).",
    )

    lora_dir: str | None = Field(
        None, description="Directory of the LoRA adapters requests may name in `loras` (`<name>.safetensors`, "
        "diffusers/PEFT or kohya keys; pickle files are never read); None = the bundled model's example adapters "
        "(dgq_zoo/loras) when serving the bundled model, else none (without `models`; with it, each entry's own).",
    )
    lora_cache_mb: int = Field(
        256, ge=1, description="MiB of LoRA adapters a worker keeps loaded; the least recently used go first.",
    )

    request_memory_mb: int | None = Field(
        None, ge=1, description="Memory (MiB) a worker may use for the requests it runs, on top of what it holds "
        "once loaded (the model); requests that need more are refused with the figures, batches are kept within "
        "it. None = what the device has free after the warm-up: a GPU's free memory, on the CPU the memory "
        "available (the cgroup's limit when lower). Set it when several workers share a host's memory.",
    )

    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="SHA-256 hashes (`sha256:<hex>`, from `dgq-hash-key`) of the accepted bearer tokens, "
        "comma-separated; empty = no authentication. Plain-text keys are refused.",
    )
    rate_limit_per_minute: float | None = Field(
        None, gt=0, description="Requests per minute each API key (each client address without keys) may make "
        "to the authenticated routes; None = no limit. Shared by all API replicas through Redis.",
    )
    rate_limit_burst: int = Field(10, ge=1, description="Requests a key may make at once before the per-minute rate "
                                  "applies (token-bucket size).")
    metrics_port: int | None = Field(
        None, description="Serve `/metrics` on this port (on `host`) instead of the API port, to keep it off the "
        "public network; None = on the API port.",
    )
    metrics_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Hashes of the bearer tokens `/metrics` demands (like `api_keys`); "
        "empty = `/metrics` is open.",
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins browsers may call the API from (comma-separated, e.g. "
        "https://app.example.com); empty = CORS off (only same-origin pages such as the playground).",
    )
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body; larger ones get 413 before "
                                "they are read.")
    max_upload_bytes: int = Field(
        16 << 20, ge=1024, description="Largest request body of the routes that take images (`/generate`, "
        "`/v1/images/edits`); larger ones get 413 before they are read.",
    )

    # --- queue ---
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "DGQ_REDIS_URL", "REDIS_URL"),
        description="redis://host:port/db; unset = the in-process queue (embedded mode).",
    )
    embedded_worker: bool | None = Field(
        None, description="Run a worker inside the API process; None = only when no Redis is configured."
    )
    queue_max: int = Field(64, ge=1, description="Jobs queued or running before POST answers 429.")
    result_ttl_s: float = Field(600.0, gt=0, description="How long images are kept after a job ends (then 410).")
    request_timeout_s: float = Field(120.0, gt=0, description="How long a synchronous request waits for its images.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 429 and 503.")

    # --- batching / workers ---
    max_batch: int = Field(4, ge=1, description="Most images one denoising loop runs together.")
    batch_window_s: float = Field(0.05, ge=0, description="How long a worker waits for more compatible jobs.")
    worker_id: str | None = Field(None, description="Consumer name in the Redis group; None = host-pid-random.")
    worker_metrics_port: int | None = Field(9100, description="Port of a worker's own /metrics; None = off, 0 = any.")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often a worker renews its claim on running jobs.")
    worker_ttl_s: float = Field(10.0, gt=0, description="A worker silent this long is dead; its jobs are reclaimed.")
    reaper_interval_s: float = Field(5.0, gt=0, description="How often a worker looks for jobs of dead workers.")
    max_deliveries: int = Field(3, ge=1, description="Deliveries after which a job goes to the dead-letter stream.")

    # --- limits ---
    model_limits: dict[str, ModelLimitSettings] = Field(
        default_factory=dict,
        description="Request limits per model, by the model's name (a name of `models`, else the `model` setting), as JSON: "
        '{"bundled": {"max_width": 128, "max_pixels": 9216, "max_steps": 50, "max_num_images": 2}}. Limits left '
        "out are derived from the model: sides 3x its native ones, pixels 4x its native area, steps and images the "
        "caps below. The caps below apply on top.",
    )
    max_width: int = Field(1024, ge=8, description="Cap on every model's width limit (a multiple of 8).")
    max_height: int = Field(1024, ge=8, description="Cap on every model's height limit (a multiple of 8).")
    max_steps: int = Field(100, ge=1, description="Cap on every model's steps limit.")
    max_num_images: int = Field(4, ge=1, description="Cap on every model's images-per-request limit.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt or negative prompt in characters, "
                                  "checked before tokenizing (the token limit of the text encoder applies too).")
    max_input_pixels: int = Field(
        16 << 20, ge=64, description="Most pixels (width x height) an uploaded image or mask may have, read from its "
        "header before it is decoded (decompression bombs get 422).",
    )
    prompt_cache_size: int = Field(256, ge=0, description="Prompts whose text-encoder output is kept (LRU).")

    @field_validator("api_keys", "metrics_api_keys", "cors_allow_origins", "model_roots", mode="before")
    @classmethod
    def _split_comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("api_keys", "metrics_api_keys")
    @classmethod
    def _hashes_only(cls, keys: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        # Refused rather than accepted with a warning: a plain key in an env file, a ConfigMap or the process
        # environment is exactly what hashing at rest is for, and a warning scrolls by. SecretStr keeps the
        # refused value out of this error message.
        plain = [n for n, key in enumerate(keys, 1) if not is_key_hash(key.get_secret_value())]
        if plain:
            raise ValueError(
                f"{info.field_name} entries {plain} (counting from 1) are plain-text keys; store their hashes "
                f"instead: {HASH_HELP}. Clients keep sending the keys themselves."
            )
        return keys

    @field_validator("model", "quantized")
    @classmethod
    def _inside_model_roots(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            check_inside_model_roots(info.field_name, value, info.data.get("model_roots") or [])
        return value

    @model_validator(mode="after")
    def _heartbeats_well_within_worker_ttl(self) -> Settings:
        # The reaper takes jobs idle for worker_ttl_s; a live worker's heartbeat resets their idle time. Heartbeats
        # further apart would let a live worker's running jobs be reclaimed and run a second time elsewhere; half
        # the TTL leaves room for one late heartbeat.
        if self.heartbeat_interval_s > self.worker_ttl_s / 2:
            raise ValueError(
                f"heartbeat_interval_s {self.heartbeat_interval_s:g} is more than half of worker_ttl_s "
                f"{self.worker_ttl_s:g}: live workers would lose their running jobs to the reaper; lower "
                "heartbeat_interval_s or raise worker_ttl_s"
            )
        return self

    @field_validator("worker_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose passes an unset variable as "" (`${SECOND_WORKER_MODEL:-}`)
        return None if value == "" else value

    @field_validator("models")
    @classmethod
    def _model_entries(cls, models: dict[str, ModelSource], info: ValidationInfo) -> dict[str, ModelSource]:
        roots = info.data.get("model_roots") or []
        for name, source in models.items():
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (at most "
                                 "64, starting with a letter or digit)")
            check_inside_model_roots(f"models[{name!r}].model", source.model, roots)
            if source.quantized is not None:
                check_inside_model_roots(f"models[{name!r}].quantized", source.quantized, roots)
        return models

    @model_validator(mode="after")
    def _models_or_one_model(self) -> Settings:
        # Both at once would leave it unclear which one `model` without a name means.
        single = sorted({"model", "quantized", "lora_dir"} & self.model_fields_set)
        if self.models and single:
            raise ValueError(f"{', '.join(single)} and models are both set: with models, give each model's "
                             "model, quantized and lora_dir in its entry")
        if self.worker_model is not None and self.worker_model not in self.served_models:
            raise ValueError(f"worker_model {self.worker_model!r} is not one of the served models "
                             f"({', '.join(map(repr, self.served_models))})")
        return self

    @model_validator(mode="after")
    def _limits_name_the_served_model(self) -> Settings:
        # A name that is not served is a typo whose limits would silently not apply.
        unknown = sorted(set(self.model_limits) - set(self.served_models))
        if unknown:
            raise ValueError(
                f"model_limits names {', '.join(map(repr, unknown))}, which this deployment does not serve: key the "
                f"limits by a served model's name ({', '.join(map(repr, self.served_models))})"
            )
        return self

    @property
    def worker_in_api(self) -> bool:
        """Whether the API process runs a worker itself."""
        return self.embedded_worker if self.embedded_worker is not None else self.redis_url is None

    @property
    def served_models(self) -> dict[str, ModelSource]:
        """Name -> source of every model the deployment serves, the default one (a request without `model`) first."""
        if self.models:
            return self.models
        return {self.model: ModelSource(model=self.model, quantized=self.quantized, lora_dir=self.lora_dir)}

    @property
    def default_model(self) -> str:
        """The name of the model a request without `model` runs."""
        return next(iter(self.served_models))

    @property
    def worker_model_name(self) -> str:
        """The model a dgq-worker process serves: `worker_model`, else the only one.

        Raises:
            ValueError: several models are served and `worker_model` names none of them.
        """
        if self.worker_model is not None:
            return self.worker_model
        if len(self.served_models) > 1:
            raise ValueError(f"this deployment serves several models ({', '.join(self.served_models)}): tell each "
                             "worker which one with DGQ_WORKER_MODEL (--worker_model)")
        return self.default_model

    def api_key_hashes(self) -> list[str]:
        """The `sha256:<hex>` hashes of the accepted API keys."""
        return [key.get_secret_value() for key in self.api_keys]

    def metrics_key_hashes(self) -> list[str]:
        """The `sha256:<hex>` hashes of the keys `/metrics` accepts."""
        return [key.get_secret_value() for key in self.metrics_api_keys]


def check_inside_model_roots(what: str, value: str, roots: list[str]) -> None:
    """Refuse a local model directory outside the allowed ones.

    Args:
        what (`str`): how the error names the path, e.g. "model".
        value (`str`): a directory, hub id or keyword ('bundled', 'auto', 'none'); only directories are checked.
        roots (`list[str]`): the allowed directories (`model_roots`); empty = any.

    Raises:
        ValueError: `value` is a directory that resolves (symlinks followed) outside every one of `roots`.
    """
    if not roots or not _is_local_path(value):
        return
    resolved = Path(value).expanduser().resolve()  # symlinks followed: a link out of a root is outside
    if not any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in roots):
        raise ValueError(
            f"{what} {value} resolves to {resolved}, outside the allowed model directories "
            f"(model_roots: {', '.join(roots)}): move it under one of them or add its directory to DGQ_MODEL_ROOTS"
        )


def _is_local_path(value: str) -> bool:
    """Whether a `model`/`quantized` value names a directory rather than a hub id or a keyword: it exists (as
    diffusers prefers a local directory over a hub id of the same name) or is written as a path."""
    if value in (BUNDLED_MODEL, "auto", "none"):
        return False
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
