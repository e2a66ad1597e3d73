"""The models a deployment serves: which quantized checkpoint goes with each, and what each process loads of it (the
API the text side, a worker the UNet and VAE). The one place the service reaches the model library, through its public
API (`dgq_core`)."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

import dgq_core
from service.config import BUNDLED_MODEL, ModelSource, Settings, check_inside_model_roots
from service.memory import scaled_to_area
from service.schemas import MODEL_SCHEDULER, SIZE_MULTIPLE, ModelLimits

log = logging.getLogger(__name__)

LOADING = threading.RLock()
"""Held while a model loads, and by whoever builds torch modules while another thread may be loading one:
diffusers loads through accelerate's `init_empty_weights`, which patches `torch.nn.Module` for the whole process,
so modules built meanwhile (another model's, in the embedded workers of several models) land on the meta device."""

SIDE_MULTIPLE = 3
"""A model's default width and height limits are this many times its native ones."""
AREA_MULTIPLE = 4
"""A model's default pixel limit is this many times its native area: 2x the native sides at its aspect ratio (a
model trained at one size draws poorly far beyond it, and its time and memory grow with the area)."""


def _is_quantized_model_dir(path: str | Path) -> bool:
    return dgq_core.is_quantized_unet_dir(Path(path) / "unet")


def shipped_quantized_dir(model_ref: str | Path) -> Path:
    """Where a pre-quantized checkpoint shipped with a model directory lies: `<model dir>-dgq` beside it."""
    model_dir = Path(model_ref)
    return model_dir.with_name(f"{model_dir.name}-dgq")


def auto_quantized_dir(settings: Settings, source: ModelSource) -> Path:
    """Where `quantized='auto'` caches the checkpoint it makes for the model of `source`."""
    model_name = Path(str(source.model_ref)).name or "model"
    return Path(settings.quantized_cache_dir).expanduser() / f"{model_name}-dgq"


def quantized_checkpoint(settings: Settings, name: str | None = None) -> str | None:
    """The quantized checkpoint to put into a served model, None when there is none to add.

    'none': none. A path: that one. 'auto', in order: the model directory is itself quantized (None); a checkpoint
    shipped beside it (`shipped_quantized_dir`); the cache, filled at the first start by `dgq_core.quantize_pretrained`
    with its defaults (one process quantizes, the others on the same disk wait for it).

    Args:
        settings (`Settings`): the deployment's settings.
        name (`str | None`): which of `settings.served_models`; None = the default one.

    Raises:
        ValueError: with `model_roots`, a directory this leads to lies outside them (`_check_model_roots`).
    """
    source = settings.served_models[name or settings.default_model]
    checkpoint = _find_quantized_checkpoint(settings, source)
    _check_model_roots(settings, source, checkpoint)
    return checkpoint


def _check_model_roots(settings: Settings, source: ModelSource, checkpoint: str | None) -> None:
    """Refuse the directories a configured model leads to outside `model_roots`: the checkpoint quantized='auto'
    found beside the model, and the base model a quantized model directory names (its `base_model`).

    `Settings` checks the configured paths themselves; the bundled model and the cache quantized='auto' fills are
    always allowed.

    Raises:
        ValueError: one of them resolves outside `model_roots`.
    """
    if not settings.model_roots or source.model == BUNDLED_MODEL:
        return
    base = dgq_core.resolve_model(source.model_ref, checkpoint).base
    check_inside_model_roots(f"the base model of {source.model},", base, settings.model_roots)
    if checkpoint is not None and Path(checkpoint) != auto_quantized_dir(settings, source):
        check_inside_model_roots("the quantized checkpoint", checkpoint, settings.model_roots)


def _find_quantized_checkpoint(settings: Settings, source: ModelSource) -> str | None:
    if source.quantized in (None, "none"):
        return None
    if source.quantized != "auto":
        return source.quantized
    if _is_quantized_model_dir(source.model_ref):
        return None
    shipped = shipped_quantized_dir(source.model_ref)
    if _is_quantized_model_dir(shipped):
        return str(shipped)
    target = auto_quantized_dir(settings, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_quantized_model_dir(target):
            log.info("quantizing %s into %s (first start; cached afterwards)", source.model_ref, target)
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            dgq_core.quantize_pretrained(source.model_ref, partial, dgq_core.DGQConfig())
            partial.rename(target)
    return str(target)


class ServedModel:
    """One served model, resolved once: its checkpoint, quantization (`quant_config`, None for full precision)
    and native (width, height), and loaders for the parts each process runs.

    Args:
        settings (`Settings`): the deployment's settings (`models` or `model`/`quantized`, `model_roots`, `device`,
            ...).
        name (`str | None`): which of `settings.served_models`; None = the default one.

    Raises:
        ValueError: a directory the model leads to lies outside `model_roots`.
        dgq_core.CheckpointError: the checkpoint is missing or corrupt.
    """

    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.default_model
        self.source = settings.served_models[self.name]
        self.checkpoint = quantized_checkpoint(settings, self.name)
        self.resolved = dgq_core.resolve_model(self.source.model_ref, self.checkpoint)
        unet_dir = self.resolved.quantized_unet
        self.quant_config = None if unet_dir is None else dgq_core.read_quant_config(unet_dir)
        self.native_size = self._native_size()
        self.limits = self._limits()

    def quantization_info(self) -> dict[str, str]:
        """Method, bits, attention-probability codes and exec mode of the served UNet (the model info metric,
        `/v1/models`)."""
        config = self.quant_config
        if config is None:
            return {"quant_method": "none", "bits": "fp", "prob_quantizer": "none", "exec_mode": "none"}
        prob_quantizer = config.prob_quantizer if config.method == "dgq" else "none"
        return {"quant_method": config.method, "bits": f"W{config.w_bits}A{config.a_bits}",
                "prob_quantizer": prob_quantizer, "exec_mode": self.settings.exec_mode}

    def _native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at, from its config files; 512x512 when they cannot be read."""
        settings = self.settings
        if settings.default_width and settings.default_height:
            return settings.default_width, settings.default_height
        model_dir = Path(self.source.model_ref)
        try:
            unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
            vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            return settings.default_width or 512, settings.default_height or 512
        sample = unet_config["sample_size"]
        sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
        scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        return settings.default_width or sample_w * scale, settings.default_height or sample_h * scale

    def _limits(self) -> ModelLimits:
        """The model's request limits: those set for it in `model_limits`, else derived from its native size
        (`SIDE_MULTIPLE`, `AREA_MULTIPLE`), each held to the deployment's caps (`max_width`, ...)."""
        settings = self.settings
        chosen = settings.model_limits.get(self.name)
        native_width, native_height = self.native_size
        derived = {
            "max_width": SIDE_MULTIPLE * native_width, "max_height": SIDE_MULTIPLE * native_height,
            "max_pixels": AREA_MULTIPLE * native_width * native_height,
            "max_steps": settings.max_steps, "max_num_images": settings.max_num_images,
        }
        caps = {"max_width": settings.max_width, "max_height": settings.max_height,
                "max_steps": settings.max_steps, "max_num_images": settings.max_num_images}
        limits = {}
        for name, default in derived.items():
            value = getattr(chosen, name) if chosen is not None and getattr(chosen, name) is not None else default
            limits[name] = min(value, caps.get(name, value))
        for side in ("max_width", "max_height"):
            limits[side] = max(SIZE_MULTIPLE, limits[side] // SIZE_MULTIPLE * SIZE_MULTIPLE)
        limits["max_pixels"] = min(limits["max_pixels"], limits["max_width"] * limits["max_height"])
        return ModelLimits(**limits)

    def limit_problems(self, width: int, height: int, steps: int, num_images: int) -> list[str]:
        """What a request of these values breaks of the model's limits, each saying what to ask for instead.

        Args:
            width, height (`int`): image size in pixels.
            steps (`int`): denoising steps.
            num_images (`int`): images of the request.
        """
        limits, model = self.limits, f"of model {self.name}"
        problems = []
        if width > limits.max_width:
            problems.append(f"width {width} is above the limit {limits.max_width} {model}: ask for at most "
                            f"{limits.max_width}")
        if height > limits.max_height:
            problems.append(f"height {height} is above the limit {limits.max_height} {model}: ask for at most "
                            f"{limits.max_height}")
        if width * height > limits.max_pixels and not problems:
            problems.append(
                f"{width}x{height} is {width * height} pixels, above the limit {limits.max_pixels} {model}: ask for "
                f"a smaller size, e.g. {'x'.join(map(str, scaled_to_area(width, height, limits.max_pixels)))}"
            )
        if steps > limits.max_steps:
            problems.append(f"steps {steps} is above the limit {limits.max_steps} {model}: ask for at most "
                            f"{limits.max_steps}")
        if num_images > limits.max_num_images:
            problems.append(f"num_images {num_images} is above the limit {limits.max_num_images} {model}: ask for "
                            f"at most {limits.max_num_images} (or send several requests)")
        return problems

    @cached_property
    def scheduler_config(self) -> dict[str, object]:
        """The model's own scheduler config (with `_class_name`)."""
        from diffusers import DDIMScheduler

        # load_config reads any scheduler's config file; the class only names the file (scheduler_config.json)
        return dict(DDIMScheduler.load_config(self.resolved.base, subfolder="scheduler"))

    @cached_property
    def samplers(self) -> list[str]:
        """The samplers a request may name for this model (`dgq_core.available_samplers`)."""
        return dgq_core.available_samplers(self.scheduler_config)

    @cached_property
    def default_sampler(self) -> str:
        """What a request without `scheduler` runs: the name of the model's own scheduler among the samplers, or
        `MODEL_SCHEDULER` when it is none of them."""
        return dgq_core.sampler_name(self.scheduler_config) or MODEL_SCHEDULER

    @cached_property
    def inpainting_only(self) -> bool:
        """Whether the UNet is an inpainting one (9 input channels: latents, mask, masked image), which runs
        inpainting jobs only."""
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.load_config(self.resolved.base, subfolder="unet")["in_channels"] == 9

    @cached_property
    def prompt_tokens(self) -> int:
        """Length of the model's text embeddings: its tokenizer pads every prompt to `model_max_length` (77 for CLIP,
        20 for the bundled model), and a DGQ UNet calibrated at that length accepts no other."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.resolved.base, subfolder="tokenizer").model_max_length

    def load_conditioner(self, text_side_of: dgq_core.PromptConditioner | None = None) -> dgq_core.PromptConditioner:
        """The API's part: tokenizer, text encoder and the prompt-specific attention parameters.

        Args:
            text_side_of (`dgq_core.PromptConditioner | None`): another served model's conditioner on the same base
                model (`resolved.base`), whose text encoder this one shares.
        """
        with LOADING:
            return dgq_core.PromptConditioner.from_pretrained(
                self.source.model_ref, quantized=self.checkpoint, text_side_of=text_side_of
            )

    def lora_library(self, device: str | torch.device = "cpu") -> dgq_core.LoRALibrary:
        """The LoRA adapters requests may name (`lora_dir`), loaded on first use onto `device`, within
        `lora_cache_mb`."""
        return dgq_core.LoRALibrary(self.source.lora_path, self.settings.lora_cache_mb << 20, device=device)

    def load_worker_pipeline(self) -> DiffusionPipeline:
        """A worker's part: the quantized UNet, VAE and scheduler, batch-invariant, its attention scores within the
        budget; no text encoder."""
        settings = self.settings
        with LOADING:
            pipe = dgq_core.from_pretrained(
                self.source.model_ref, quantized=self.checkpoint, device=settings.device,
                exec_mode=settings.exec_mode, load_text_encoder=False,
            )
        dgq_core.make_batch_invariant(pipe.unet)
        dgq_core.set_attention_budget(pipe.unet, settings.attention_budget_mb << 20)
        return pipe


def component_weight_bytes(pipe: DiffusionPipeline) -> Iterator[tuple[str, str, int]]:
    """(component, precision, bytes) of the parameters and buffers of each loaded torch component."""
    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        by_dtype: dict[str, int] = {}
        for tensor in [*module.parameters(), *module.buffers()]:
            dtype = str(tensor.dtype).removeprefix("torch.")
            by_dtype[dtype] = by_dtype.get(dtype, 0) + tensor.numel() * tensor.element_size()
        for dtype, size in by_dtype.items():
            yield component, dtype, size
