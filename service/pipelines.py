"""Every place the service touches the model library (dgq_core): loading, prompt encoding, prompt-specific
parameters, the quantized checkpoint to serve. Nothing else in `service` imports dgq_core or diffusers models."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dgq_core.layers import MIN_CONV_BATCH, MIN_GEMM_ROWS
from service.config import BUNDLED_MODEL, Settings, check_inside_model_roots

log = logging.getLogger(__name__)

PromptParams = dict[str, torch.Tensor]
"""Prompt-specific DGQ cross-attention parameters of one prompt (name -> tensor)."""

QUANTIZED_UNET_CONFIG = Path("unet") / "config.json"


def _is_quantized_model_dir(path: str | Path) -> bool:
    config_file = Path(path) / QUANTIZED_UNET_CONFIG
    return config_file.is_file() and "quantization_config" in json.loads(config_file.read_text())


def shipped_quantized_dir(model_ref: str | Path) -> Path:
    """Where a pre-quantized checkpoint shipped with a model directory lies: `<model dir>-dgq` beside it."""
    model_dir = Path(model_ref)
    return model_dir.with_name(f"{model_dir.name}-dgq")


def auto_quantized_dir(settings: Settings) -> Path:
    """Where `quantized='auto'` caches the checkpoint it makes for `settings.model`."""
    model_name = Path(str(settings.model_ref)).name or "model"
    return Path(settings.quantized_cache_dir).expanduser() / f"{model_name}-dgq"


def quantized_checkpoint(settings: Settings) -> str | None:
    """The quantized checkpoint to put into the model, None when there is none to add.

    'none': none. A path: that one. 'auto', in order: the model directory is itself quantized (None); a checkpoint
    shipped beside it (`shipped_quantized_dir`); the cache, filled at the first start by `dgq quantize` with its
    defaults (one process quantizes, the others on the same disk wait for it).

    Raises:
        ValueError: with `model_roots`, a directory this leads to lies outside them (`_check_model_roots`).
    """
    checkpoint = _find_quantized_checkpoint(settings)
    _check_model_roots(settings, checkpoint)
    return checkpoint


def _check_model_roots(settings: Settings, checkpoint: str | None) -> None:
    """Refuse the directories a configured model leads to outside `model_roots`: the checkpoint quantized='auto'
    found beside the model, and the base model a quantized model directory names (its `base_model`).

    `Settings` checks the configured paths themselves; the bundled model and the cache quantized='auto' fills are
    always allowed.

    Args:
        settings (`Settings`): the model, its `quantized` and `model_roots`.
        checkpoint (`str | None`): what `quantized_checkpoint` chose.

    Raises:
        ValueError: one of them resolves outside `model_roots`.
    """
    if not settings.model_roots or settings.model == BUNDLED_MODEL:
        return
    from dgq_core.pipeline import resolve_model

    base = resolve_model(settings.model_ref, checkpoint).base
    check_inside_model_roots(f"the base model of {settings.model},", base, settings.model_roots)
    if checkpoint is not None and Path(checkpoint) != auto_quantized_dir(settings):
        check_inside_model_roots("the quantized checkpoint", checkpoint, settings.model_roots)


def _find_quantized_checkpoint(settings: Settings) -> str | None:
    if settings.quantized in (None, "none"):
        return None
    if settings.quantized != "auto":
        return settings.quantized
    if _is_quantized_model_dir(settings.model_ref):
        return None
    shipped = shipped_quantized_dir(settings.model_ref)
    if _is_quantized_model_dir(shipped):
        return str(shipped)
    target = auto_quantized_dir(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / QUANTIZED_UNET_CONFIG).is_file():
            from dgq_core.cli import main as dgq_main

            log.info("quantizing %s into %s (first start; cached afterwards)", settings.model_ref, target)
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            if dgq_main(["quantize", "--model", str(settings.model_ref), "--out", str(partial)]) != 0:
                raise RuntimeError(f"quantizing {settings.model_ref} failed")
            partial.rename(target)
    return str(target)


def quantization_info(settings: Settings) -> dict[str, str]:
    """Method, bits and attention-probability codes of the served UNet, for the model info metric."""
    from dgq_core.checkpoint import read_quant_config
    from dgq_core.pipeline import resolve_model

    unet_dir = resolve_model(settings.model_ref, quantized_checkpoint(settings)).quantized_unet
    if unet_dir is None:
        return {"quant_method": "none", "bits": "fp"}
    config = read_quant_config(unet_dir)
    prob_quantizer = config.prob_quantizer if config.method == "dgq" else "none"
    return {"quant_method": config.method, "bits": f"W{config.w_bits}A{config.a_bits}", "prob_quantizer": prob_quantizer}


def prompt_tokens(settings: Settings) -> int:
    """Length of the model's text embeddings: its tokenizer pads every prompt to `model_max_length` (77 for CLIP,
    20 for the bundled model), and a DGQ UNet calibrated at that length accepts no other."""
    from transformers import AutoTokenizer

    from dgq_core.pipeline import resolve_model

    base = resolve_model(settings.model_ref, quantized_checkpoint(settings)).base
    return AutoTokenizer.from_pretrained(base, subfolder="tokenizer").model_max_length


def load_worker_pipeline(settings: Settings) -> DiffusionPipeline:
    """The pipeline a worker runs: quantized UNet, VAE and scheduler; no text encoder."""
    from dgq_core.pipeline import load_pipeline

    pipe = load_pipeline(
        settings.model_ref, quantized=quantized_checkpoint(settings), device=settings.device,
        exec_mode=settings.exec_mode, load_text_encoder=False,
    )
    make_batch_invariant(pipe.unet)
    return pipe


@dataclass
class EncodedPrompt:
    """Text-encoder output of one prompt and its prompt-specific parameters.

    Args:
        embeds (`torch.Tensor`): token embeddings (tokens, dim).
        pooled (`torch.Tensor | None`): pooled embedding (dim,) of models that condition on it (SDXL), else None.
        params (`PromptParams`): DGQ cross-attention parameters (empty for a full-precision model).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    params: PromptParams


class PromptEncoder:
    """Tokenizer + text encoder + the DGQ prompt-specific parameters of the configured model."""

    def __init__(self, settings: Settings) -> None:
        from dgq_core.pipeline import PromptEncoder as DGQPromptEncoder

        self._encoder = DGQPromptEncoder.from_pretrained(settings.model_ref, quantized=quantized_checkpoint(settings))
        self.max_tokens: int = self._encoder.max_tokens

    @property
    def pipeline(self) -> DiffusionPipeline:
        """The pipeline holding the tokenizer and text encoder (UNet and VAE released)."""
        return self._encoder.pipe

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` including <start> and <end>."""
        return self._encoder.count_tokens(prompt)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[EncodedPrompt]:
        batch = self._encoder.encode(prompts)
        return [
            EncodedPrompt(batch.embeds[row], None if batch.pooled is None else batch.pooled[row], params)
            for row, params in enumerate(batch.attention_params)
        ]


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
    """safetensors bytes of named tensors; a tensor given under two names (a prompt that is also its negative
    prompt, from the cache) is written twice, as safetensors refuses shared memory."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    unshared = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        key = (tensor.data_ptr(), tuple(tensor.shape))
        unshared[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return save_safetensors(unshared)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def pack_prompt(prompt: EncodedPrompt, negative: EncodedPrompt) -> bytes:
    """One job's tensors as one safetensors blob: embeddings of prompt and negative prompt (+ pooled ones for SDXL)
    and their DGQ parameters."""
    tensors = {"prompt_embeds": prompt.embeds, "negative_prompt_embeds": negative.embeds}
    if prompt.pooled is not None:
        tensors |= {"pooled_prompt_embeds": prompt.pooled, "negative_pooled_prompt_embeds": negative.pooled}
    tensors |= {f"params/{name}": t for name, t in prompt.params.items()}
    tensors |= {f"negative_params/{name}": t for name, t in negative.params.items()}
    return tensors_to_bytes(tensors)


def unpack_prompt(data: bytes) -> tuple[EncodedPrompt, EncodedPrompt]:
    """Inverse of `pack_prompt`: (prompt, negative prompt)."""
    tensors = tensors_from_bytes(data)

    def with_prefix(prefix: str) -> PromptParams:
        return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}

    return (
        EncodedPrompt(tensors["prompt_embeds"], tensors.get("pooled_prompt_embeds"), with_prefix("params/")),
        EncodedPrompt(
            tensors["negative_prompt_embeds"], tensors.get("negative_pooled_prompt_embeds"),
            with_prefix("negative_params/"),
        ),
    )


# --- batch invariance ---
# CPU GEMM/conv kernels round differently for calls with few rows, so a request's image could depend on its batch.
# DGQ's quantized layers pad such calls after quantizing their input (dgq_core.layers); these hooks do the same for
# the modules left in full precision (conv_in, conv_out, and every layer of an unquantized model).


def _pad_rows(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    linear = type(module) is torch.nn.Linear
    rows = x.numel() // x.shape[-1] if linear else x.shape[0]
    minimum = MIN_GEMM_ROWS if linear else MIN_CONV_BATCH
    if rows >= minimum:
        return None
    module._unpadded_shape = x.shape
    if linear:
        x = x.reshape(rows, x.shape[-1])
    padding = x.new_zeros((minimum - rows, *x.shape[1:]))
    return (torch.cat([x, padding]), *args[1:])


def _unpad_rows(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    shape = module.__dict__.pop("_unpadded_shape", None)
    if shape is None:
        return None
    if type(module) is torch.nn.Linear:
        return output[: shape[:-1].numel()].reshape(*shape[:-1], output.shape[-1])
    return output[: shape[0]]


def make_batch_invariant(unet: torch.nn.Module) -> None:
    """Pad few-row inputs of the UNet's full-precision Linear/Conv2d layers so results do not depend on batch size."""
    for module in unet.modules():
        if type(module) in (torch.nn.Linear, torch.nn.Conv2d):
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
