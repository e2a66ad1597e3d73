"""Prompt conditioning, owned in one place: from prompt text to what the UNet reads, and the bytes that carry it
between processes.

    conditioner = PromptConditioner.from_pretrained(model_ref, quantized=checkpoint)   # API process
    prompt, negative = conditioner.encode([text, negative_text])
    payload = pack_prompt_pair(prompt, negative)                                       # queued as bytes
    prompt, negative = unpack_prompt_pair(payload)                                     # worker process
    with conditioning(pipe, [prompt], [negative], guidance_scale) as text_inputs:
        latents = pipe(**text_inputs, output_type="latent").images

For a DGQ-quantized UNet the prompt-specific attention parameters travel with the embeddings: cross-attention keys
and values depend only on the text, so they are computed (and quantized, the `<start>` key exact) once per prompt
in the API process, and injected into the UNet's attention processors for the batch, which then skips `to_k`/`to_v`.
Everything crosses processes as safetensors, never pickle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .attention import DGQAttnProcessor, cross_attention_processors, split_heads
from .layers import ActQuantizer, quantize_activation
from .lora import AdapterSet, use_loras
from .quantizers import dequantize_uniform

PromptParams = dict[str, torch.Tensor]
"""Prompt-specific DGQ cross-attention parameters of one prompt (name -> tensor); empty for a full-precision UNet."""


@dataclass
class EncodedPrompt:
    """Text-encoder output of one prompt and its prompt-specific parameters.

    Args:
        embeds (`torch.Tensor`): token embeddings (tokens, dim).
        pooled (`torch.Tensor | None`): pooled embedding (dim,) of models that condition on it (SDXL), else None.
        params (`PromptParams`): DGQ cross-attention parameters.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    params: PromptParams


class PromptConditioner:
    """Tokenizer + text encoder(s) of a pipeline and the quantized UNet's cross-attention modules: prompts in,
    `EncodedPrompt`s out.

    Args:
        pipe (`DiffusionPipeline`): holds the tokenizer(s) and text encoder(s); its UNet and VAE may be released.
        cross_attention (`dict`): `cross_attention_processors` of the quantized UNet (empty for full precision).
    """

    def __init__(self, pipe: DiffusionPipeline, cross_attention: dict[str, tuple[nn.Module, DGQAttnProcessor]]) -> None:
        self.pipeline = pipe
        self.cross_attention = cross_attention

    @classmethod
    def from_pretrained(
        cls, model_ref: str | Path, quantized: str | Path | None = None, device: str | torch.device = "cpu",
        text_side_of: PromptConditioner | None = None,
    ) -> PromptConditioner:
        """Load the text side of a model; of the UNet only the cross-attention modules are kept.

        Args:
            model_ref, quantized: as for `dgq_core.from_pretrained`.
            device (`str | torch.device`): where the text encoder runs.
            text_side_of (`PromptConditioner | None`): a conditioner of another model on the same base (e.g. the
                same model quantized otherwise, or not at all) whose tokenizer(s) and text encoder(s) this one
                shares instead of loading its own.

        Raises:
            ValueError: `text_side_of` was loaded from another base model.
        """
        from .pipeline import TEXT_COMPONENTS, from_pretrained, resolve_model

        if text_side_of is not None and text_side_of.pipeline.name_or_path != resolve_model(model_ref, quantized).base:
            raise ValueError(f"the text side of {text_side_of.pipeline.name_or_path} cannot serve {model_ref}: "
                             "another base model")
        pipe = from_pretrained(model_ref, quantized=quantized, device=device, load_text_encoder=text_side_of is None)
        if text_side_of is not None:
            shared = text_side_of.pipeline.components
            pipe.register_modules(**{name: shared[name] for name in TEXT_COMPONENTS if name in shared})
        cross_attention = cross_attention_processors(pipe.unet)
        pipe.unet = None
        pipe.vae = None
        return cls(pipe, cross_attention)

    @property
    def max_tokens(self) -> int:
        """Longest prompt, in tokens including start and end tokens."""
        return self.pipeline.tokenizer.model_max_length

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` including <start> and <end>."""
        return len(self.pipeline.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.inference_mode()
    def encode(self, prompts: list[str], loras: list[AdapterSet] | None = None) -> list[EncodedPrompt]:
        """Encode prompts the way the pipeline itself would (no classifier-free guidance pairing here).

        Args:
            prompts (`list[str]`): the prompts.
            loras (`list[AdapterSet] | None`): each prompt's LoRA adapters: those targeting cross-attention
                `to_k`/`to_v` change the precomputed keys and values exactly as they change the UNet's own.
        """
        pipe = self.pipeline
        device = pipe._execution_device  # noqa: SLF001 -- the pipeline's own notion of its device
        encoded = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        embeds = encoded[0]
        pooled = encoded[2] if len(encoded) == 4 else None
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            # SDXL conditions an absent negative prompt on zeros, not on the encoding of ""; serving sends "" for it
            empty = torch.tensor([prompt == "" for prompt in prompts], device=embeds.device)
            embeds = embeds.masked_fill(empty[:, None, None], 0.0)
            pooled = pooled.masked_fill(empty[:, None], 0.0)
        params = compute_prompt_params(self.cross_attention, embeds, loras)
        return [
            EncodedPrompt(embeds[row], None if pooled is None else pooled[row], row_params)
            for row, row_params in enumerate(params)
        ]


def _encode_quantized(prefix: str, x: torch.Tensor, quantizer: ActQuantizer) -> dict[str, torch.Tensor]:
    params = quantizer.params(x.shape)
    if params.mode == "none":
        return {prefix: x.contiguous()}
    codes, scale, zero_point = quantize_activation(x, params, quantizer.kind)
    # Scales stay in their broadcast shape (per group index, not per element) to keep the payload small.
    return {
        f"{prefix}.codes": codes.to(torch.uint8),
        f"{prefix}.scale": _with_rank(scale, x.dim()),
        f"{prefix}.zero_point": _with_rank(zero_point, x.dim()),
    }


def _with_rank(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.reshape([1] * (rank - t.dim()) + list(t.shape)).contiguous()


def _decode_quantized(prefix: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if prefix in tensors:
        return tensors[prefix]
    return dequantize_uniform(tensors[f"{prefix}.codes"], tensors[f"{prefix}.scale"], tensors[f"{prefix}.zero_point"])


@torch.no_grad()
def compute_prompt_params(
    cross_attention: dict[str, tuple[nn.Module, DGQAttnProcessor]],
    encoder_hidden_states: torch.Tensor,
    loras: list[AdapterSet] | None = None,
) -> list[PromptParams]:
    """The prompt-specific DGQ attention parameters: quantized cross-attention keys and values, one dict per prompt.

    Keys and values of cross-attention depend only on the text embedding, so they are computed once per request
    instead of at every denoising step. Each is stored as uint8 codes with its group scale and zero point (the start
    key separately, in full precision), so a worker reproduces exactly the values the UNet would compute itself.

    Args:
        cross_attention (`dict`): `cross_attention_processors(unet)` of a quantized UNet.
        encoder_hidden_states (`torch.Tensor`): text-encoder output (B, tokens, dim).
        loras (`list[AdapterSet] | None`): each prompt's LoRA adapters, whose side branches on `to_k`/`to_v` run
            here as they would in the UNet (`dgq_core.lora.use_loras`); None: none.

    Returns:
        `list[PromptParams]`: per prompt, tensors named `<attention module>.key...`/`.value...`; empty dicts
        when there are no DGQ cross-attention modules (a full-precision UNet).
    """
    per_prompt: list[PromptParams] = [{} for _ in range(encoder_hidden_states.shape[0])]
    # A DGQ UNet computes in FP32 whatever the text encoder's dtype (`pipeline.component_dtype`): so do its keys here.
    encoder_hidden_states = encoder_hidden_states.float()
    projections = {
        f"{name}.{projection}": getattr(attn, projection)
        for name, (attn, _) in cross_attention.items() for projection in ("to_k", "to_v")
    }
    with use_loras(projections, loras or [], strict=False):
        for name, (attn, processor) in cross_attention.items():
            key, value = _key_value(attn, encoder_hidden_states)
            for index in range(len(per_prompt)):
                sample_key, sample_value = key[index : index + 1], value[index : index + 1]
                tensors = per_prompt[index]
                if processor.keep_start:
                    tensors[f"{name}.key_start"] = sample_key[:, :, :1].contiguous()
                    sample_key = sample_key[:, :, 1:]
                tensors.update(_encode_quantized(f"{name}.key", sample_key, processor.k_quant))
                tensors.update(_encode_quantized(f"{name}.value", sample_value, processor.v_quant))
    return per_prompt


def _key_value(attn: nn.Module, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-split cross-attention keys and values of text embeddings, before their quantizers."""
    ehs = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    return split_heads(attn.to_k(ehs), attn.heads), split_heads(attn.to_v(ehs), attn.heads)


@contextlib.contextmanager
def use_prompt_params(unet: nn.Module, params: list[PromptParams]) -> Iterator[None]:
    """Run the UNet with precomputed cross-attention keys/values (a full-precision UNet, whose rows have no
    parameters, runs as it is).

    Args:
        unet (`nn.Module`): a quantized UNet.
        params (`list[PromptParams]`): one dict per row of the UNet batch, in batch order (with classifier-free
            guidance diffusers stacks [negative prompts..., prompts...]).
    """
    if not any(params):
        yield
        return
    processors = cross_attention_processors(unet)
    device = next(unet.parameters()).device
    params = [{name: tensor.to(device) for name, tensor in sample.items()} for sample in params]
    try:
        for name, (_, processor) in processors.items():
            keys = [_decode_quantized(f"{name}.key", sample) for sample in params]
            if processor.keep_start:
                keys = [torch.cat((sample[f"{name}.key_start"], key), dim=2) for sample, key in zip(params, keys, strict=True)]
            values = [_decode_quantized(f"{name}.value", sample) for sample in params]
            processor.injected_kv = (torch.cat(keys), torch.cat(values))
        yield
    finally:
        for _, processor in processors.values():
            processor.injected_kv = None


@contextlib.contextmanager
def conditioning(
    pipe: DiffusionPipeline,
    prompts: list[EncodedPrompt],
    negatives: list[EncodedPrompt],
    guidance_scale: float,
    loras: list[AdapterSet] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The text inputs of one pipeline call over these rows, with the UNet using their precomputed parameters
    and each image's LoRA adapters (on its prompt's and its negative prompt's rows).

    Args:
        pipe (`DiffusionPipeline`): the pipeline that will run (its UNet, possibly quantized).
        prompts, negatives (`list[EncodedPrompt]`): one prompt and one negative prompt per image.
        guidance_scale (`float`): the call's classifier-free guidance scale (above 1, diffusers runs the negative
            rows first).
        loras (`list[AdapterSet] | None`): one adapter set per image (None: none); their prompt parameters must
            have been encoded with the same adapters (`PromptConditioner.encode(..., loras)`).

    Yields:
        `dict[str, torch.Tensor]`: keyword arguments for `pipe(...)`: prompt and negative prompt embeddings (and the
        pooled ones for SDXL).
    """
    device = pipe.unet.device
    text_inputs = {
        "prompt_embeds": torch.stack([p.embeds for p in prompts]).to(device),
        "negative_prompt_embeds": torch.stack([n.embeds for n in negatives]).to(device),
    }
    if prompts[0].pooled is not None:  # SDXL also conditions on the pooled text embedding
        text_inputs["pooled_prompt_embeds"] = torch.stack([p.pooled for p in prompts]).to(device)
        text_inputs["negative_pooled_prompt_embeds"] = torch.stack([n.pooled for n in negatives]).to(device)
    row_params = [p.params for p in prompts]
    row_loras = list(loras or [[] for _ in prompts])
    if guidance_scale > 1.0:
        row_params = [n.params for n in negatives] + row_params
        row_loras = row_loras + row_loras
    with use_prompt_params(pipe.unet, row_params), use_loras(pipe.unet, row_loras):
        yield text_inputs


@contextlib.contextmanager
def text_conditioning(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negative_prompts: list[str] | None,
    guidance_scale: float,
    loras: list[AdapterSet] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """`conditioning` from prompt text, in one process (`dgq generate`, the eval harness): a DGQ UNet's
    cross-attention keys and values are computed once for the call, as the service's API process computes them for
    its workers, instead of at every denoising step.

    Args:
        pipe (`DiffusionPipeline`): the pipeline that will run, with its tokenizer(s) and text encoder(s).
        prompts (`list[str]`): one prompt per image.
        negative_prompts (`list[str] | None`): one per image; None: "" for each, as diffusers' default.
        guidance_scale, loras: as `conditioning`'s.
    """
    conditioner = PromptConditioner(pipe, cross_attention_processors(pipe.unet))
    negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    # Prompts and negative prompts in separate text-encoder calls, as diffusers encodes them.
    encoded = conditioner.encode(prompts, loras), conditioner.encode(negatives, loras)
    with conditioning(pipe, *encoded, guidance_scale, loras) as text_inputs:
        yield text_inputs


# --- the wire format: one safetensors blob per job ---


def _tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of named tensors; a tensor given under two names (a prompt that is also its negative
    prompt, from a cache) is written twice, as safetensors refuses shared memory."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    unshared = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        key = (tensor.data_ptr(), tuple(tensor.shape))
        unshared[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return save_safetensors(unshared)


def pack_prompt_pair(prompt: EncodedPrompt, negative: EncodedPrompt) -> bytes:
    """One job's conditioning as one safetensors blob: embeddings of prompt and negative prompt (+ pooled ones for
    SDXL) and their DGQ parameters."""
    tensors = {"prompt_embeds": prompt.embeds, "negative_prompt_embeds": negative.embeds}
    if prompt.pooled is not None:
        tensors |= {"pooled_prompt_embeds": prompt.pooled, "negative_pooled_prompt_embeds": negative.pooled}
    tensors |= {f"params/{name}": t for name, t in prompt.params.items()}
    tensors |= {f"negative_params/{name}": t for name, t in negative.params.items()}
    return _tensors_to_bytes(tensors)


def unpack_prompt_pair(data: bytes) -> tuple[EncodedPrompt, EncodedPrompt]:
    """Inverse of `pack_prompt_pair`: (prompt, negative prompt)."""
    tensors = load_safetensors(data)

    def with_prefix(prefix: str) -> PromptParams:
        return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}

    return (
        EncodedPrompt(tensors["prompt_embeds"], tensors.get("pooled_prompt_embeds"), with_prefix("params/")),
        EncodedPrompt(
            tensors["negative_prompt_embeds"], tensors.get("negative_pooled_prompt_embeds"),
            with_prefix("negative_params/"),
        ),
    )
