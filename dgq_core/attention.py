"""DGQ attention: quantized Q/K/V, log2-quantized attention probabilities, the `<start>` token kept exact.

The processor replaces diffusers' attention processor on every `Attention` module of a quantized UNet. Attention is
computed with an explicit softmax so the probabilities can be quantized:

- "dgq": Q, K, V group-quantized; probabilities log2-quantized with a dynamic scale `s = max(P)` taken **per sample**
  (the official code pools it over the whole batch, which would make one user's image depend on another's prompt);
  in cross-attention the `<start>` column of P and the start key stay in full precision and `s` excludes them.
  `prob_quantizer="uniform"` swaps the log2 codes for uniform ones with the same scale (an ablation), "log-sqrt2"
  for base-sqrt(2) log codes (half the log2 step; not the paper's, see `QuantConfig.prob_quantizer`).
- "pertensor": per-tensor Q/K/V, probabilities uniform with a calibrated per-step range (Q-Diffusion-style).
- "dynamic": per-token Q/K/V, probabilities uniform with a per-query-row range computed at run time.

Cross-attention keys and values depend only on the prompt: `dgq_core.conditioning` computes them once per request
and sets them as a processor's `injected_kv` for a batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .batch_invariance import MIN_GEMM_ROWS
from .layers import ActQuantizer
from .quantizers import MIN_SCALE, dynamic_rowwise_params, fake_quant_log2_, fake_quant_uniform, qmax
from .steps import StepState


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*d) -> (B, heads, T, d)."""
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, heads, dim // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads*d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


# Per thread: each thread that runs attention keeps the largest buffer of each name it needed (`reusable_buffer`), up
# to this size; larger ones (SD at 512 px: 1 GiB of scores per CFG pair) are allocated per call, not held for good.
_scratch = threading.local()
MAX_RETAINED_BUFFER_BYTES = 256 << 20
# The scores one attention call materializes at most (float32, all samples and heads); larger calls run in blocks of
# query rows. SD v1.5 at 512 px needs 1 GiB for a CFG pair's self-attention, at 1024 px 16 GiB.
DEFAULT_SCORES_BUDGET_BYTES = 256 << 20


def reusable_buffer(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of `size` elements of `like`'s dtype and device, kept per thread under `name` and reused by the
    next call that fits it, up to `MAX_RETAINED_BUFFER_BYTES` (larger ones are allocated per call).

    The probabilities of a 1024-token self-attention are 64 MB per SD batch of two: a fresh tensor of that size is
    allocated with fresh pages (glibc maps allocations above 32 MB anew each time), and touching them for the first
    time costs four times the matmul that fills them (17 ms vs 3.6 ms, 2 threads). The buffer is only valid until the
    next call of the same thread for `name`, which is after this attention call is done with it.
    """
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < size or buffer.device != like.device or buffer.dtype != like.dtype:
        buffer = torch.empty(size, dtype=like.dtype, device=like.device)
        if size * buffer.element_size() <= MAX_RETAINED_BUFFER_BYTES:
            setattr(_scratch, name, buffer)
    return buffer[:size]


def _attention_scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * query @ key^T` as float32 (B, heads, queries, keys), written into a buffer reused across calls
    (`reusable_buffer`)."""
    batch, heads, queries, head_dim = query.shape
    keys = key.shape[2]
    scores = reusable_buffer("scores", batch * heads * queries * keys, query).view(batch * heads, queries, keys)
    torch.baddbmm(
        scores, query.reshape(-1, queries, head_dim), key.reshape(-1, keys, head_dim).transpose(1, 2),
        beta=0, alpha=scale, out=scores,
    )  # fmt: skip
    return scores.view(batch, heads, queries, keys).float()


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, written over `scores` on the CPU: the probabilities of a 1024-token self-attention
    are 64 MB per SD batch of two, and a fresh tensor of that size costs as much in page faults as the softmax."""
    if scores.device.type != "cpu":
        return scores.softmax(dim=-1)
    # The last-dim kernel reads each row before it writes it, so aliasing input and output is safe.
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


# Code steps per halving of the probability of each log quantizer: base 2 (the method) and base sqrt(2).
LOG_CODE_STEPS_PER_OCTAVE = {"log2": 1, "log-sqrt2": 2}
# Probability codes by `QuantConfig.prob_quantizer` name, as the fused attention kernels take them.
PROB_QUANTIZER_IDS = {"log2": 0, "log-sqrt2": 1, "uniform": 2}


def sample_scale(probs: torch.Tensor, keep_start: bool) -> torch.Tensor:
    """The dynamic scale of Eq. 8, one per sample: the largest probability of the sample over every head, query and
    key, the `<start>` column left out when it is kept exact. (B, 1, 1, 1)."""
    return (probs[..., 1:] if keep_start else probs).amax(dim=(1, 2, 3), keepdim=True)


def quantize_probs_per_sample(
    probs: torch.Tensor,
    bits: int,
    keep_start: bool,
    quantizer: str = "log2",
    scale: torch.Tensor | None = None,
    scale_is_max: bool = True,
) -> torch.Tensor:
    """Quantize attention probabilities with one dynamic scale per sample (paper Eq. 8-9), in place.

    Args:
        probs (`torch.Tensor`): softmax output (B, heads, queries, keys), float32; overwritten.
        bits (`int`): code width.
        keep_start (`bool`): keep column 0 (the `<start>` token of cross-attention) exact and leave it out of the scale.
        quantizer (`str`): "log2" (codes `round(-log2(p / s))`, the method), "log-sqrt2" (`round(-2 log2(p / s))`)
            or "uniform" (codes of step `s / (2^b - 1)`).
        scale (`torch.Tensor | None`): the samples' `sample_scale`, when `probs` holds only some of their query rows,
            or a static scale; None: from `probs`.
        scale_is_max (`bool`): no probability exceeds `scale` (the dynamic scale); False (a static scale) clamps
            the ones above it to it.
    """
    scale = sample_scale(probs, keep_start) if scale is None else scale
    if quantizer in LOG_CODE_STEPS_PER_OCTAVE:
        # Every quantized probability is at most the scale; the start column may exceed it, and stays exact.
        return fake_quant_log2_(probs, scale, bits, at_most_scale=scale_is_max,
                                steps_per_octave=LOG_CODE_STEPS_PER_OCTAVE[quantizer], exact_first_column=keep_start)
    start = probs[..., :1].clone() if keep_start else None
    step = (scale / qmax(bits)).clamp_min(torch.finfo(probs.dtype).tiny)
    probs.copy_(fake_quant_uniform(probs, step, torch.zeros_like(step), bits))
    if keep_start:
        probs[..., :1] = start
    return probs


# Candidates of the static probability scale (Table 3's ablation), as the official code's quantile search has them.
STATIC_SCALE_QUANTILES = (0.999, 0.9999, 0.99999)


def static_prob_scale(samples: torch.Tensor, bits: int, quantizer: str = "log2") -> torch.Tensor:
    """The static scale of the probability codes: the quantile of the calibration probabilities (`samples`, any
    shape) among `STATIC_SCALE_QUANTILES` whose codes reconstruct them with the least squared error. (1,)."""
    values = samples.detach().float().reshape(1, 1, 1, -1)
    candidates = torch.quantile(values.flatten(), torch.tensor(STATIC_SCALE_QUANTILES)).clamp_min(MIN_SCALE)

    def error(scale: torch.Tensor) -> float:
        quantized = quantize_probs_per_sample(values.clone(), bits, False, quantizer, scale, scale_is_max=False)
        return float((quantized - values).pow(2).sum())

    return min(candidates, key=error).reshape(1)


def query_block_rows(batch_heads: int, queries: int, keys: int, budget_bytes: int) -> int:
    """How many query rows of every (sample, head) one block of float32 scores holds: as many as fit `budget_bytes`,
    all `queries` at most, and at least `MIN_GEMM_ROWS`, below which CPU GEMMs round differently (the blocks would
    then flip codes that the whole call does not: see `batch_invariance`)."""
    return min(queries, max(MIN_GEMM_ROWS, budget_bytes // max(1, 4 * batch_heads * keys)))


class ExplicitAttnProcessor(nn.Module):
    """diffusers attention computed with an explicit softmax, with a hook on each of Q, K, V and the probabilities.

    Subclasses quantize (`DGQAttnProcessor`) or record statistics (calibration) in the hooks; the attention itself
    is written once, here.

    The scores of a call are materialized whole while they fit `scores_budget_bytes`; beyond that the call runs in
    blocks of query rows that each fit it (`query_block_rows`). Softmax is row-local, so blocks give the same probabilities; a hook that
    needs one value over all rows of a sample (DGQ's dynamic scale, `needs_sample_scale`) gets it from a first pass
    over the blocks, so that the codes are the same as unblocked.

    Args:
        keep_start (`bool`): the first key (the `<start>` token of cross-attention) bypasses `on_key`.
        scores_budget_bytes (`int`): largest float32 score block of one call (`set_attention_budget`).
    """

    def __init__(self, keep_start: bool, scores_budget_bytes: int = DEFAULT_SCORES_BUDGET_BYTES) -> None:
        super().__init__()
        self.keep_start = keep_start
        self.scores_budget_bytes = scores_budget_bytes
        # Prompt-specific keys/values of the current batch, set by `use_prompt_params`.
        self.injected_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    # Whether `on_probs` takes the samples' `sample_scale` over all their query rows.
    needs_sample_scale = False

    def on_query(self, query: torch.Tensor) -> torch.Tensor:
        return query

    def on_key(self, key: torch.Tensor) -> torch.Tensor:
        return key

    def on_value(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def on_probs(self, probs: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Hook on the probabilities (B, heads, rows, keys) of some or all query rows; `scale` is the samples'
        `sample_scale` when `needs_sample_scale` and the rows are a block, else None."""
        return probs

    def key_value(self, attn: nn.Module, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-split keys and values (B, heads, T, head_dim) after their hooks."""
        key = split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        value = split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        if self.keep_start:
            key = torch.cat((key[:, :, :1], self.on_key(key[:, :, 1:])), dim=2)
        else:
            key = self.on_key(key)
        return key, self.on_value(value)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self.on_query(split_heads(attn.to_q(hidden_states), attn.heads))
        if self.injected_kv is not None:
            key, value = self.injected_kv
            if key.shape[0] != batch_size:
                raise ValueError(f"prompt parameters for {key.shape[0]} samples, but the UNet batch has {batch_size}")
        else:
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key, value = self.key_value(attn, encoder_hidden_states)

        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size)
            mask = mask.view(batch_size, attn.heads, -1, key.shape[2])
        hidden_states = merge_heads(self._attend(query, key, value, attn.scale, mask))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _probs(self, query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        scores = _attention_scores(query, key, scale)
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, : query.shape[2]])
        return _softmax_(scores)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`on_probs(softmax(scale * q k^T + mask)) @ v`, (B, heads, queries, head_dim), in blocks of query rows
        whose scores fit the budget."""
        batch, heads, queries, _ = query.shape
        rows = query_block_rows(batch * heads, queries, key.shape[2], self.scores_budget_bytes)
        if rows == queries:
            return self.on_probs(self._probs(query, key, scale, mask)).to(value.dtype) @ value
        blocks = [slice(start, min(start + rows, queries)) for start in range(0, queries, rows)]

        def block_mask(block: slice) -> torch.Tensor | None:
            return None if mask is None or mask.shape[2] == 1 else mask[:, :, block]

        sample_scale_ = None
        if self.needs_sample_scale:
            for block in blocks:  # first pass: the samples' scale over all their rows (max is exact in any order)
                block_scale = sample_scale(self._probs(query[:, :, block], key, scale, block_mask(block)), self.keep_start)
                sample_scale_ = block_scale if sample_scale_ is None else torch.maximum(sample_scale_, block_scale)
        out = torch.empty(*query.shape[:3], value.shape[3], dtype=value.dtype, device=value.device)
        for block in blocks:
            probs = self._probs(query[:, :, block], key, scale, block_mask(block))
            out[:, :, block] = self.on_probs(probs, sample_scale_).to(value.dtype) @ value
        return out


def set_attention_budget(model: nn.Module, budget_bytes: int) -> None:
    """Bound the attention scores one call of any DGQ attention processor of `model` materializes.

    Args:
        model (`nn.Module`): a quantized UNet.
        budget_bytes (`int`): largest float32 score block; larger calls run in blocks of query rows.
    """
    if budget_bytes < 1:
        raise ValueError(f"the scores budget must be positive, got {budget_bytes}")
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, ExplicitAttnProcessor):
            processor.scores_budget_bytes = budget_bytes


@dataclass(frozen=True)
class ScoresFootprint:
    """The largest float32 attention-score block one UNet call materializes, as a function of its batch and latent
    size, without the UNet: what a memory estimate needs of the attention, whose scores grow with the square of the
    image's area until the budget splits them into blocks of query rows.

    It is that of the UNet's largest self-attention (its queries and keys both grow with the image, and it has the
    most of them); cross-attention has as many keys as prompt tokens, fewer than any image but the tiniest has.

    Attributes:
        heads (`int`): attention heads of that self-attention.
        downscale (`int`): the side of its feature map is the latent's side divided by this (2 per UNet level).
        budget_bytes (`int | None`): its processor's `scores_budget_bytes`; None when it materializes no scores
            (diffusers' SDPA processor: fused kernels).
    """

    heads: int
    downscale: int
    budget_bytes: int | None

    def bytes(self, batch: int, latent_height: int, latent_width: int) -> int:
        """Bytes of the largest score block a UNet call on `batch` latents of this size materializes."""
        if self.budget_bytes is None:
            return 0
        tokens = math.ceil(latent_height / self.downscale) * math.ceil(latent_width / self.downscale)
        rows = query_block_rows(batch * self.heads, tokens, tokens, self.budget_bytes)
        return 4 * batch * self.heads * rows * tokens


def scores_footprint(unet: nn.Module) -> ScoresFootprint:
    """The `ScoresFootprint` of a diffusers `UNet2DConditionModel` (SD 1.x/2.x, SDXL), quantized or not.

    Levels come from diffusers' module names: down block i runs at level i, the mid block at the lowest level, up
    block i at the mirrored level; each level halves the feature map's side.

    Raises:
        ValueError: the UNet has no self-attention where these names put it.
    """
    levels = len(unet.down_blocks)
    largest: tuple[float, ScoresFootprint] | None = None
    for name, module in unet.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or getattr(module, "is_cross_attention", True):
            continue
        block, _, rest = name.partition(".")
        index = int(rest.partition(".")[0]) if block in ("down_blocks", "up_blocks") else 0
        level = {"down_blocks": index, "mid_block": levels - 1, "up_blocks": levels - 1 - index}.get(block)
        if level is None:
            continue
        budget = processor.scores_budget_bytes if isinstance(processor, ExplicitAttnProcessor) else None
        footprint = ScoresFootprint(heads=module.heads, downscale=2**level, budget_bytes=budget)
        size = module.heads / footprint.downscale**4  # unblocked scores: heads x tokens^2, tokens ~ 1 / downscale^2
        if largest is None or size > largest[0]:
            largest = (size, footprint)
    if largest is None:
        raise ValueError("no self-attention found in the UNet's down, mid or up blocks")
    return largest[1]


class DGQAttnProcessor(ExplicitAttnProcessor):
    """Quantized attention for one diffusers `Attention` module (whose `to_q/to_k/to_v/to_out[0]` are QuantLinear).

    Args:
        method (`str`): activation method ("dgq", "pertensor" or "dynamic").
        bits (`int`): bits of Q/K/V and of the attention probabilities.
        is_cross (`bool`): whether this is cross-attention (keys/values from the text embedding).
        q_quant, k_quant, v_quant (`ActQuantizer`): quantizers of the head-split Q, K, V.
        state (`StepState`): the UNet's step state.
        prob_scale, prob_zero_point (`torch.Tensor | None`): per-step calibrated range of P ("pertensor"), or
            per-step static scale (S, 1) of "dgq" with `static_scale`.
        prob_quantizer (`str`): "log2", "log-sqrt2" or "uniform" codes for "dgq" (see `DGQConfig.prob_quantizer`).
        start_split (`bool`): "dgq" keeps the `<start>` column and key of cross-attention exact (the method).
        static_scale (`bool`): "dgq" takes the calibrated per-step `prob_scale` instead of Eq. 8's dynamic one.
    """

    def __init__(
        self,
        method: str,
        bits: int,
        is_cross: bool,
        q_quant: ActQuantizer,
        k_quant: ActQuantizer,
        v_quant: ActQuantizer,
        state: StepState,
        prob_scale: torch.Tensor | None = None,
        prob_zero_point: torch.Tensor | None = None,
        prob_quantizer: str = "log2",
        start_split: bool = True,
        static_scale: bool = False,
    ) -> None:
        super().__init__(keep_start=is_cross and method == "dgq" and start_split)
        self.method, self.bits, self.is_cross = method, bits, is_cross
        self.prob_quantizer, self.static_scale = prob_quantizer, static_scale
        self.q_quant, self.k_quant, self.v_quant = q_quant, k_quant, v_quant
        self.state = state
        self.register_buffer("prob_scale", prob_scale if prob_scale is not None else torch.zeros(0))
        self.register_buffer("prob_zero_point", prob_zero_point if prob_zero_point is not None else torch.zeros(0))
        # Where integers run (`kernels.set_exec_mode`), the fused kernel that computes `_attend` in one call:
        # `kernels.triton_attention.dgq_attention` on CUDA, `kernels.cpu_attention.dgq_attention` on CPUs with
        # AVX-512; None: `_attend`.
        self.fused_attention: Callable | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The per-step probability range has as many rows as calibrated steps, unknown before loading.
        own = {prefix + "prob_scale", prefix + "prob_zero_point"}
        for key in own & state_dict.keys():
            setattr(self, key[len(prefix):], state_dict[key].clone())
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[:] = [k for k in missing_keys if k not in own]

    def _apply(self, fn, recurse=True):
        # A kernel belongs to the device it was chosen for: after a move `set_exec_mode` chooses again.
        self.fused_attention = None
        return super()._apply(fn, recurse)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.fused_attention is not None and mask is None:
            return self.fused_attention(query, key, value, scale, self.bits, self.prob_quantizer, self.keep_start,
                                        scores_budget_bytes=self.scores_budget_bytes)
        return super()._attend(query, key, value, scale, mask)

    def on_query(self, query: torch.Tensor) -> torch.Tensor:
        return self.q_quant(query)

    def on_key(self, key: torch.Tensor) -> torch.Tensor:
        return self.k_quant(key)

    def on_value(self, value: torch.Tensor) -> torch.Tensor:
        return self.v_quant(value)

    @property
    def needs_sample_scale(self) -> bool:
        return self.method == "dgq" and not self.static_scale

    def _calibrated_step(self) -> int:
        return min(self.state.step, self.prob_scale.shape[0] - 1)

    def on_probs(self, probs: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.method == "dgq" and self.static_scale:
            static = self.prob_scale[self._calibrated_step()].view(1, 1, 1, 1)
            return quantize_probs_per_sample(probs, self.bits, self.keep_start, self.prob_quantizer, static, False)
        if self.method == "dgq":
            return quantize_probs_per_sample(probs, self.bits, self.keep_start, self.prob_quantizer, scale)
        if self.method == "pertensor":
            step = self._calibrated_step()
            return fake_quant_uniform(probs, self.prob_scale[step], self.prob_zero_point[step], self.bits)
        scale, zero_point = dynamic_rowwise_params(probs, self.bits)
        return fake_quant_uniform(probs, scale, zero_point, self.bits)


def cross_attention_processors(unet: nn.Module) -> dict[str, tuple[nn.Module, DGQAttnProcessor]]:
    """Every cross-attention module of a quantized UNet with its DGQ processor, by module name."""
    found = {}
    for name, module in unet.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, DGQAttnProcessor) and processor.is_cross:
            found[name] = (module, processor)
    return found
