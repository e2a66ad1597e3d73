"""Load ready-to-run diffusers pipelines with a DGQ-quantized UNet, and the per-request prompt front stage.

A model reference is a diffusers pipeline directory or hub id. A quantized pipeline directory has the usual
diffusers layout with a quantized `unet/` (see checkpoint.py); it is self-contained when it also carries the other
components, otherwise its `quantization_config.base_model` names where they come from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .attention import compute_prompt_params, cross_attention_processors
from .checkpoint import CheckpointError, is_quantized_unet_dir, load_quantized_unet, read_quant_config
from .config import EXEC_MODES, QuantConfig

# Components a worker does not need: the text side runs in the API process.
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


def load_pipeline(
    model_ref: str | Path,
    *,
    quantized: str | Path | None = None,
    device: str | torch.device = "cpu",
    exec_mode: str = "auto",
    load_text_encoder: bool = True,
) -> DiffusionPipeline:
    """A diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...) with the quantized UNet.

    Args:
        model_ref (`str | Path`): full-precision pipeline directory or hub id, or a quantized pipeline directory.
        quantized (`str | Path | None`): quantized checkpoint to put into a full-precision `model_ref`.
        device (`str | torch.device`): where the model runs.
        exec_mode (`str`): "fake" (quantize-dequantize reference), "int" (integer kernels) or "auto" (integer
            kernels on the devices and for the layer sizes in `kernels.auto_min_weights`, fake elsewhere).
        load_text_encoder (`bool`): load the tokenizer(s) and text encoder(s); workers that receive prompt
            embeddings from the API leave them out.
    """
    if exec_mode not in EXEC_MODES:
        raise ValueError(f"exec_mode must be one of {EXEC_MODES}, got {exec_mode!r}")
    resolved = resolve_model(model_ref, quantized)
    overrides = {}
    if resolved.quantized_unet is not None:
        overrides["unet"] = load_quantized_unet(resolved.quantized_unet, device)
    if not load_text_encoder:
        index = _model_index(resolved.base)
        overrides.update({name: None for name in TEXT_COMPONENTS if name in index})
    pipe = DiffusionPipeline.from_pretrained(resolved.base, **overrides)
    pipe = pipe.to(device)
    if resolved.quantized_unet is not None and exec_mode != "fake":
        from .kernels import auto_min_weights, enable_int_execution

        min_weights = 0 if exec_mode == "int" else auto_min_weights(device)
        if min_weights is not None:
            enable_int_execution(pipe.unet, min_weights=min_weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_index(base: str) -> dict:
    path = Path(base) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(base, "model_index.json")).read_text())


def save_quantized_pipeline(pipe: DiffusionPipeline, config: QuantConfig, out_dir: str | Path, self_contained: bool) -> Path:
    """Write a quantized pipeline directory.

    Args:
        pipe (`DiffusionPipeline`): the pipeline whose UNet was quantized by calibration.
        config (`QuantConfig`): its settings (`base_model` should name the full-precision source).
        out_dir (`str | Path`): output directory; an existing quantized UNet there is replaced.
        self_contained (`bool`): also save the other components (VAE, text encoder, tokenizer, scheduler) so the
            directory loads on its own.
    """
    from .checkpoint import save_quantized_unet

    out_dir = Path(out_dir)
    if self_contained:
        unet = pipe.unet
        # save_pretrained would write the quantized UNet as ordinary weights; it is written separately below.
        pipe.unet = None
        try:
            pipe.save_pretrained(out_dir, safe_serialization=True)
        finally:
            pipe.unet = unet
        index_path = out_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        index_path.write_text(json.dumps(index, indent=2))
    unet_dir = out_dir / "unet"
    if unet_dir.exists():
        shutil.rmtree(unet_dir)
    save_quantized_unet(pipe.unet, config, unet_dir)
    return out_dir


@dataclass
class PromptBatch:
    """Text-side inputs of a batch of prompts.

    Args:
        embeds (`torch.Tensor`): text-encoder output (B, tokens, dim).
        pooled (`torch.Tensor | None`): pooled embedding (SDXL), else None.
        attention_params (`list[dict[str, torch.Tensor]]`): prompt-specific DGQ attention parameters per prompt
            (empty dicts for a full-precision model).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    attention_params: list[dict[str, torch.Tensor]]


class PromptEncoder:
    """The API-side front stage: tokenize, text-encode, and compute prompt-specific DGQ attention parameters.

    Only the text encoder(s) and the quantized UNet's cross-attention modules are kept; the rest of the UNet is
    released after loading.
    """

    def __init__(self, pipe: DiffusionPipeline, cross_attention: dict) -> None:
        self.pipe = pipe
        self.cross_attention = cross_attention

    @classmethod
    def from_pretrained(
        cls, model_ref: str | Path, quantized: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> PromptEncoder:
        pipe = load_pipeline(model_ref, quantized=quantized, device=device)
        cross_attention = cross_attention_processors(pipe.unet)
        pipe.unet = None
        pipe.vae = None
        return cls(pipe, cross_attention)

    @property
    def max_tokens(self) -> int:
        """Longest prompt, in tokens including start and end tokens."""
        return self.pipe.tokenizer.model_max_length

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> PromptBatch:
        """Encode prompts the way the pipeline itself would (no classifier-free guidance pairing here)."""
        device = self.pipe._execution_device  # noqa: SLF001 -- the pipeline's own notion of its device
        encoded = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        embeds = encoded[0]
        pooled = encoded[2] if len(encoded) == 4 else None
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            # SDXL conditions an absent negative prompt on zeros, not on the encoding of ""; serving sends "" for it
            empty = torch.tensor([prompt == "" for prompt in prompts], device=embeds.device)
            embeds = embeds.masked_fill(empty[:, None, None], 0.0)
            pooled = pooled.masked_fill(empty[:, None], 0.0)
        return PromptBatch(embeds, pooled, compute_prompt_params(self.cross_attention, embeds))
