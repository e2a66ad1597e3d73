"""Every place the service touches the model library: loading, prompt encoding, prompt-specific parameters.

`dgq_core.pipeline` provides the DGQ-quantized pipeline and `PromptEncoder`; until a deployment has it (or when
`quantized` is 'none' and the model is a plain diffusers directory), the plain diffusers pipeline stands in with
no prompt-specific parameters. Nothing else in `service` imports diffusers or dgq_core.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service.config import Settings

PromptParams = dict[str, torch.Tensor]
"""Prompt-specific DGQ cross-attention parameters of one prompt (name -> tensor)."""

HAS_DGQ_PIPELINE = importlib.util.find_spec("dgq_core.pipeline") is not None


def _quantized_ref(settings: Settings) -> str | None:
    return None if settings.quantized in (None, "none") else settings.quantized


def use_dgq(settings: Settings) -> bool:
    """Whether this deployment runs the DGQ-quantized pipeline (else plain diffusers, full precision)."""
    return HAS_DGQ_PIPELINE and _quantized_ref(settings) is not None


def load_worker_pipeline(settings: Settings) -> DiffusionPipeline:
    """The pipeline a worker runs: quantized UNet, VAE and scheduler; no text encoder."""
    if use_dgq(settings):
        from dgq_core.pipeline import load_pipeline

        pipe = load_pipeline(
            settings.model_ref, quantized=_quantized_ref(settings), device=settings.device,
            exec_mode=settings.exec_mode, load_text_encoder=False,
        )
    else:
        pipe = DiffusionPipeline.from_pretrained(
            str(settings.model_ref), text_encoder=None, tokenizer=None, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        ).to(settings.device)
    pipe.set_progress_bar_config(disable=True)
    make_batch_invariant(pipe.unet)
    return pipe


@dataclass
class EncodedPrompts:
    """Text-encoder output of a list of prompts and their prompt-specific parameters, one per prompt."""

    embeds: torch.Tensor
    params: list[PromptParams]


class PromptEncoder:
    """Tokenizer + text encoder (+ the DGQ prompt-specific parameters) of the configured model."""

    def __init__(self, settings: Settings) -> None:
        if use_dgq(settings):
            from dgq_core.pipeline import PromptEncoder as DGQPromptEncoder

            self._dgq = DGQPromptEncoder.from_pretrained(settings.model_ref, quantized=_quantized_ref(settings))
            self.max_tokens: int = self._dgq.max_tokens
        else:
            from transformers import CLIPTextModel, CLIPTokenizer

            self._dgq = None
            model_dir = Path(settings.model_ref)
            self._tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
            self._text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
            self.max_tokens = self._tokenizer.model_max_length

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` including <start> and <end>."""
        tokenizer = self._dgq.tokenizer if self._dgq is not None else self._tokenizer
        return len(tokenizer(prompt).input_ids)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> EncodedPrompts:
        if self._dgq is not None:
            batch = self._dgq.encode(prompts)
            return EncodedPrompts(embeds=batch.embeds, params=list(batch.attention_params))
        ids = self._tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        return EncodedPrompts(embeds=self._text_encoder(ids)[0], params=[{} for _ in prompts])


def prompt_params_scope(unet: torch.nn.Module, params: list[PromptParams]) -> contextlib.AbstractContextManager:
    """Context in which `unet` uses the precomputed per-row parameters (rows in the UNet's batch order)."""
    if not any(params):
        return contextlib.nullcontext()
    from dgq_core.attention import use_prompt_params

    return use_prompt_params(unet, params)


def native_size(settings: Settings) -> tuple[int, int]:
    """(width, height) the model was trained at, from its config files; 512x512 when they cannot be read."""
    if settings.default_width and settings.default_height:
        return settings.default_width, settings.default_height
    model_dir = Path(settings.model_ref)
    try:
        unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
        vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return settings.default_width or 512, settings.default_height or 512
    sample = unet_config["sample_size"]
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return settings.default_width or sample_w * scale, settings.default_height or sample_h * scale


# --- tensors across processes (safetensors, never pickle) ---


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()})


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def pack_prompt(embeds: torch.Tensor, negative: torch.Tensor, params: PromptParams, negative_params: PromptParams) -> bytes:
    """One job's tensors as one safetensors blob: embeddings [77, D] of prompt and negative prompt + parameters."""
    tensors = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    tensors |= {f"params/{name}": t for name, t in params.items()}
    tensors |= {f"negative_params/{name}": t for name, t in negative_params.items()}
    return tensors_to_bytes(tensors)


@dataclass
class PromptTensors:
    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    params: PromptParams
    negative_params: PromptParams


def unpack_prompt(data: bytes) -> PromptTensors:
    tensors = tensors_from_bytes(data)

    def with_prefix(prefix: str) -> PromptParams:
        return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}

    return PromptTensors(
        embeds=tensors["prompt_embeds"], negative_embeds=tensors["negative_prompt_embeds"],
        params=with_prefix("params/"), negative_params=with_prefix("negative_params/"),
    )


# --- batch invariance ---

_MIN_ROWS = {torch.nn.Linear: 64, torch.nn.Conv2d: 2}
"""CPU GEMM/conv kernels pick different code paths (and round differently) for few rows: Linear with < 4 rows or
a row count not a multiple of 4, Conv2d with batch 1. Padding such inputs to a fixed row count makes every row's
result independent of how many other rows share the call - a request's image does not depend on its batch."""


def _row_count(module: torch.nn.Module, x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if isinstance(module, torch.nn.Linear) else x.shape[0]


def _pad_rows(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    rows, minimum = _row_count(module, x), _MIN_ROWS[type(module)]
    if rows >= minimum:
        return None
    module._unpadded_shape = x.shape
    if isinstance(module, torch.nn.Linear):
        x = x.reshape(rows, x.shape[-1])
    padding = x.new_zeros((minimum - rows, *x.shape[1:]))
    return (torch.cat([x, padding]), *args[1:])


def _unpad_rows(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    shape = module.__dict__.pop("_unpadded_shape", None)
    if shape is None:
        return None
    if isinstance(module, torch.nn.Linear):
        return output[: _row_count(module, torch.empty(shape, device="meta"))].reshape(*shape[:-1], output.shape[-1])
    return output[: shape[0]]


def make_batch_invariant(unet: torch.nn.Module) -> None:
    """Pad few-row inputs of the UNet's Linear/Conv2d layers so results do not depend on the batch size."""
    for module in unet.modules():
        if type(module) in _MIN_ROWS:
            module.register_forward_pre_hook(_pad_rows)
            module.register_forward_hook(_unpad_rows)


def weight_bytes(pipe: DiffusionPipeline) -> Iterator[tuple[str, str, int]]:
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
