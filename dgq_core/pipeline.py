"""DGQ at the level of whole diffusers pipelines: quantize, save, load.

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    quantize_(pipe, DGQConfig(w_bits=8, a_bits=8, groups=8), prompts=calibration_prompts)
    save_pretrained(pipe, "quantized/")
    pipe = from_pretrained("quantized/", device="cuda", exec_mode="auto")

A model reference is a diffusers pipeline directory or hub id. A quantized pipeline directory has the usual diffusers
layout with a quantized `unet/` (`dgq_core.checkpoint`); it is self-contained when it also carries the other
components (then `DiffusionPipeline.from_pretrained` loads it too), otherwise its `quantization_config.base_model`
names where they come from.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .calibration import CalibrationReport, default_calibration_prompts, quantize_
from .checkpoint import CheckpointError, is_quantized_unet_dir, read_quant_config
from .config import EXEC_MODES, DGQConfig
from .diffusers_quantizer import (
    attach_quantization_config,
    load_quantized_unet,
    quantization_config_of,
    save_quantized_unet,
)
from .kernels import set_exec_mode
from .lora import load_lora, merge_lora

# Components a worker does not need: the text side runs in the API process.
# Where `quantize_pretrained` keeps an AdaRound reconstruction's finished units until the checkpoint is written.
RECON_RESUME_FILE = "adaround-progress.safetensors"
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


@dataclass
class ResolvedModel:
    """Where each part of a model comes from.

    Args:
        base (`str`): diffusers pipeline directory or hub id of the unquantized components.
        quantized_unet (`Path | None`): quantized UNet directory, or None for full precision.
    """

    base: str
    quantized_unet: Path | None


def resolve_model(model_ref: str | Path, quantized: str | Path | None = None) -> ResolvedModel:
    """Work out the base components and the quantized UNet of a model reference.

    Args:
        model_ref (`str | Path`): a full-precision pipeline (directory or hub id) or a quantized pipeline directory.
        quantized (`str | Path | None`): a quantized pipeline or UNet directory to use with a full-precision
            `model_ref`.
    """
    if quantized is not None:
        unet_dir = _quantized_unet_dir(Path(quantized))
        return ResolvedModel(str(model_ref), unet_dir)
    path = Path(model_ref)
    if path.is_dir() and is_quantized_unet_dir(path / "unet"):
        if (path / "model_index.json").is_file():
            return ResolvedModel(str(path), path / "unet")
        base = read_quant_config(path / "unet").base_model
        if not base:
            raise CheckpointError(f"{path} carries only a quantized UNet and names no base_model for the other components")
        if (path / base).is_dir():  # a local base model is stored relative to the checkpoint
            base = str((path / base).resolve())
        return ResolvedModel(base, path / "unet")
    if path.is_dir() and is_quantized_unet_dir(path):
        raise CheckpointError(f"{path} is a bare quantized UNet; pass the full-precision model as well")
    if not path.exists() and (str(model_ref).startswith((".", "/")) or str(model_ref).count("/") != 1):
        raise FileNotFoundError(f"model {model_ref} is neither a local directory nor a hub id (owner/name)")
    return ResolvedModel(str(model_ref), None)


def _quantized_unet_dir(path: Path) -> Path:
    for candidate in (path / "unet", path):
        if is_quantized_unet_dir(candidate):
            return candidate
    raise CheckpointError(f"{path} holds no DGQ-quantized UNet (expected unet/config.json with quantization_config)")


def component_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype of a pipeline's full-precision components on `device`: BF16 on CUDA, FP32 elsewhere.

    BF16 rather than FP16: SDXL's VAE overflows in FP16 and diffusers' SD pipelines do not upcast it; on Ampere and
    Hopper GPUs BF16 runs at FP16's speed. A DGQ UNet stays in FP32 around its integer kernels (its activation
    scales are FP32), with its inputs and output cast at its boundary (`_unet_at_pipeline_dtype`).
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cast_floats(item, dtype) for item in value)
    return value


def _unet_at_pipeline_dtype(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hooks that let an FP32 UNet run in a pipeline whose latents and embeddings are `dtype`: its floating inputs
    are cast to FP32, its output back to `dtype`."""

    def inputs_to_float32(module, args, kwargs):
        return _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)

    def output_to_pipeline_dtype(module, args, kwargs, output):
        if hasattr(output, "to_tuple"):  # diffusers' output class
            output.sample = output.sample.to(dtype)
            return output
        return _cast_floats(output, dtype)

    unet.register_forward_pre_hook(inputs_to_float32, with_kwargs=True)
    unet.register_forward_hook(output_to_pipeline_dtype, with_kwargs=True)


def from_pretrained(
    model_ref: str | Path,
    *,
    quantized: str | Path | None = None,
    device: str | torch.device = "cpu",
    exec_mode: str = "auto",
    load_text_encoder: bool = True,
    dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """A ready-to-run diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...) with the quantized
    UNet, the inverse of `save_pretrained`.

    Args:
        model_ref (`str | Path`): full-precision pipeline directory or hub id, or a quantized pipeline directory.
        quantized (`str | Path | None`): quantized checkpoint to put into a full-precision `model_ref`.
        device (`str | torch.device`): where the model runs.
        exec_mode (`str`): "fake" (quantize-dequantize reference), "int" (integer kernels) or "auto" (integer
            kernels on the devices and for the layer sizes in `kernels.auto_min_weights`, fake elsewhere).
        load_text_encoder (`bool`): load the tokenizer(s) and text encoder(s); workers that receive prompt
            embeddings from the API leave them out.
        dtype (`torch.dtype | None`): of the full-precision components (text encoders, VAE, a full-precision UNet);
            None: `component_dtype(device)` (BF16 on CUDA). A DGQ UNet computes in FP32 in any case.
    """
    if exec_mode not in EXEC_MODES:
        raise ValueError(f"exec_mode must be one of {EXEC_MODES}, got {exec_mode!r}")
    resolved = resolve_model(model_ref, quantized)
    overrides = {}
    if resolved.quantized_unet is not None:
        overrides["unet"] = load_quantized_unet(resolved.quantized_unet)
    if not load_text_encoder:
        index = _model_index(resolved.base)
        overrides.update({name: None for name in TEXT_COMPONENTS if name in index})
    pipe = DiffusionPipeline.from_pretrained(resolved.base, **overrides)
    dtype = component_dtype(device) if dtype is None else dtype
    if dtype != torch.float32:
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and not (name == "unet" and resolved.quantized_unet):
                component.to(dtype)
        if resolved.quantized_unet is not None:
            _unet_at_pipeline_dtype(pipe.unet, dtype)
    pipe.to(device)
    if resolved.quantized_unet is not None:
        set_exec_mode(pipe.unet, exec_mode)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_index(base: str) -> dict:
    path = Path(base) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(base, "model_index.json")).read_text())


def save_pretrained(
    pipe: DiffusionPipeline, out_dir: str | Path, *, self_contained: bool = True, base_model: str | None = None
) -> Path:
    """Write a quantized pipeline directory, the inverse of `from_pretrained`.

    Args:
        pipe (`DiffusionPipeline`): a pipeline whose UNet `quantize_` quantized.
        out_dir (`str | Path`): output directory; an existing quantized UNet there is replaced.
        self_contained (`bool`): also save the other components (VAE, text encoder, tokenizer, scheduler) so that the
            directory loads on its own (with `DiffusionPipeline.from_pretrained` too); else only `unet/`.
        base_model (`str | None`): where the other components come from, recorded in the checkpoint as given
            (required without `self_contained`).
    """
    config = quantization_config_of(pipe.unet)
    if config is None:
        raise CheckpointError("this pipeline's UNet was not quantized by dgq_core; run dgq_core.quantize_ first")
    if not self_contained and not base_model:
        raise ValueError("a checkpoint that is not self-contained must name its base_model")
    out_dir = Path(out_dir)
    if base_model is not None:
        attach_quantization_config(pipe.unet, replace(config, base_model=base_model))
    unet_dir = out_dir / "unet"
    if unet_dir.exists():
        shutil.rmtree(unet_dir)
    if self_contained:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    else:
        save_quantized_unet(pipe.unet, unet_dir)
    return out_dir


def quantize_pretrained(
    model_ref: str | Path,
    out_dir: str | Path,
    config: DGQConfig,
    *,
    prompts: list[str] | None = None,
    batch_size: int = 8,
    self_contained: bool | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    loras: list[tuple[str | Path, float]] | None = None,
) -> CalibrationReport:
    """Load a full-precision model, quantize it and write the checkpoint: what `dgq quantize` and the service's
    `quantized=auto` run.

    Args:
        model_ref (`str | Path`): full-precision diffusers directory or hub id.
        out_dir (`str | Path`): the quantized pipeline directory to write.
        config (`DGQConfig`): the settings.
        prompts (`list[str] | None`): calibration prompts; None: `default_calibration_prompts` (`config.num_calib`
            of them, seeded by `config.seed`).
        batch_size (`int`): prompts per calibration pipeline call.
        self_contained (`bool | None`): copy the other components into `out_dir`; None: yes for local models.
        progress (`bool`): show a progress bar.
        device (`str | torch.device`): where calibration runs ("cuda" on a GPU).
        loras (`list[tuple[str | Path, float]] | None`): LoRA adapter files and scales merged into the
            full-precision UNet before calibration (`merge_lora`): a checkpoint of the adapted model, calibrated on
            it, to compare with the base checkpoint running the adapter as a side branch.

    With AdaRound, the reconstruction's finished units are kept in `out_dir/RECON_RESUME_FILE` until the checkpoint
    is written: the same call after an interruption goes on from there.
    """
    if prompts is None:
        prompts = default_calibration_prompts(model_ref, config.num_calib, config.seed)
    # Statistics of the full-precision model as it is, in FP32 (the reference the quantized UNet reproduces).
    pipe = from_pretrained(model_ref, device=device, dtype=torch.float32)
    for path, scale in loras or []:
        merge_lora(pipe.unet, load_lora(path, device=device), scale)
    resume_file = Path(out_dir) / RECON_RESUME_FILE
    if config.weight_rounding == "adaround":
        resume_file.parent.mkdir(parents=True, exist_ok=True)
    report = quantize_(pipe, config, prompts, batch_size=batch_size, progress=progress, recon_resume_file=resume_file)
    local = Path(model_ref).is_dir()
    # A local base model is named relative to the checkpoint, so that the pair can move together (in a repository).
    base_model = os.path.relpath(Path(model_ref).resolve(), Path(out_dir).resolve()) if local else str(model_ref)
    save_pretrained(pipe, out_dir, self_contained=local if self_contained is None else self_contained, base_model=base_model)
    resume_file.unlink(missing_ok=True)
    return report
