"""The quantizers DGQ is built from: uniform asymmetric, log2, and 4-bit packing.

Every function here is pure tensor math with no module state, so the fake-quant layers, the integer kernels and the
tests share one definition of each number.
"""

from __future__ import annotations

import torch

from . import fake_quant_kernel

# A scale below this would make `x / scale` overflow for constant inputs; the official code floors at the same value.
MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    """Largest code of an unsigned `bits`-bit quantizer."""
    return (1 << bits) - 1


def minmax_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of an asymmetric uniform quantizer covering [lo, hi].

    Args:
        lo (`torch.Tensor`): lower end of the range (any shape).
        hi (`torch.Tensor`): upper end, same shape as `lo`.
        bits (`int`): code width.

    Returns:
        `(scale, zero_point)`: `scale = (hi - lo) / (2^b - 1)` floored at `MIN_SCALE`, `zero_point = round(-lo / scale)`
        (an integer-valued float tensor).
    """
    scale = ((hi - lo) / qmax(bits)).clamp_min(MIN_SCALE)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def quantize_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, inverse_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes `clamp(round(x * (1/s) + z), 0, 2^b - 1)` as a float tensor (exact small integers).

    `x * (1/s) + z` is rounded once, as the fused multiply-add of integer kernels' quantizers does (oneDNN, FBGEMM,
    `torch.quantize_per_tensor`), so `dgq_core.kernels` reproduces these codes bit for bit: `torch.addcmul` compiles
    to a fused multiply-add on CPU and CUDA (tests/test_quantizers.py checks it against float64 arithmetic).
    `inverse_scale`: `torch.reciprocal(scale)` computed once beforehand, by a caller that reuses it.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    inverse_scale = torch.reciprocal(scale.to(dtype)) if inverse_scale is None else inverse_scale.to(dtype)
    codes = torch.addcmul(zero_point.to(dtype), x.to(dtype), inverse_scale)
    return codes.round_().clamp_(0, qmax(bits))


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Values `s * (q - z)` of uniform codes (uint8 codes on the CPU in one pass: `fake_quant_kernel.dequantize`)."""
    fused = fake_quant_kernel.dequantize(codes, scale, zero_point)
    if fused is not None:
        return fused
    return scale * (codes.to(scale.dtype) - zero_point)


def fake_quant_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, inverse_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize: the value the integer pipeline represents `x` with.

    On the CPU in float32 this runs as one pass (`fake_quant_kernel`), bit-identical to the torch ops below.
    """
    if inverse_scale is None:
        inverse_scale = torch.reciprocal(scale.to(torch.promote_types(x.dtype, torch.float32)))
    fused = fake_quant_kernel.fake_quant(x, scale, zero_point, inverse_scale, qmax(bits))
    if fused is not None:
        return fused
    # The codes are a new tensor: dequantize them in place, `(q - z) * s` as `dequantize_uniform` computes it.
    return quantize_uniform(x, scale, zero_point, bits, inverse_scale).sub_(zero_point).mul_(scale)


def quantize_log2(p: torch.Tensor, scale: torch.Tensor, bits: int, steps_per_octave: int = 1) -> torch.Tensor:
    """Log codes `clamp(round(-k log2(p / s)), 0, 2^b - 1)` of non-negative values: base 2 with k = 1 (paper Eq. 3),
    base 2^(1/k) with `steps_per_octave` k.

    The codes are computed as `round(-log2((p / s)^k))`, the k-th power floored at the smallest normal float32
    (2^-126): zeros map to code `min(2^b - 1, 126)`, and for k = 2 ratios under 2^-63 (probabilities 10^-19 of
    the scale) do as well. Taking the power first makes every k the base-2 rounding of one float, which
    `fake_quant_log2_` computes on the float bits (where the two may differ: there).
    """
    ratio = (p / scale).pow_(steps_per_octave).clamp_min_(torch.finfo(p.dtype).tiny)
    return torch.clamp(torch.round(-torch.log2(ratio)), 0, qmax(bits))


def dequantize_log2(codes: torch.Tensor, scale: torch.Tensor, steps_per_octave: int = 1) -> torch.Tensor:
    """Values `s * 2^(-q / k)` of log codes: a shift in integer hardware (k = 1), a shift and one of k constant
    multipliers otherwise."""
    return scale * torch.exp2(-codes / steps_per_octave)


def fake_quant_log2(p: torch.Tensor, scale: torch.Tensor, bits: int, steps_per_octave: int = 1) -> torch.Tensor:
    """Log quantize then dequantize: `s * 2^(-q / k)` with `q = clamp(round(-k log2(p / s)), 0, 2^b - 1)`."""
    if p.dtype != torch.float32:
        return dequantize_log2(quantize_log2(p, scale, bits, steps_per_octave), scale, steps_per_octave)
    return fake_quant_log2_(p.clone(), scale, bits, steps_per_octave=steps_per_octave)


# round(log2 r) = e + [m > sqrt(2)] for r = m * 2^e, 1 <= m < 2: adding 2^23 - (first float32 mantissa above
# sqrt(2) - 1) to the bits of r carries into the exponent exactly when m > sqrt(2), and masking the mantissa off
# leaves 2^round(log2 r).
LOG2_ROUNDING_CARRY = (1 << 23) - 0x3504F4
EXPONENT_BITS = 0x7F800000


def fake_quant_log2_(
    p: torch.Tensor, scale: torch.Tensor, bits: int, at_most_scale: bool = False, steps_per_octave: int = 1,
    exact_first_column: bool = False,
) -> torch.Tensor:
    """`fake_quant_log2` in place on a float32 tensor, on the float bits instead of log2/exp2.

    Equal to `dequantize_log2(quantize_log2(p, scale, bits, k), scale, k)`, zeros and subnormal ratios included,
    but at the float32 `log2`'s ties: where it rounds a ratio next to a code boundary onto the boundary itself (about
    5 floats in a million), the formula's round-half-to-even may pick the neighbouring code; the float bits compare
    against the boundary exactly. Base-sqrt(2) codes (k = 2) are base-2 codes of the squared ratio, and their values
    the square roots of its powers of two. On a contiguous CPU tensor it is one pass of `fake_quant_kernel`, with the
    same IEEE operations; otherwise 5 torch ops (7 for k = 2), where log2/exp2 take 18 times as long.

    Args:
        at_most_scale (`bool`): the caller guarantees `p <= s` (the scale is their maximum): values above `s` are
            then not clamped to it.
        steps_per_octave (`int`): 1 (base 2) or 2 (base sqrt(2)).
        exact_first_column (`bool`): leave `p[..., 0]` unquantized (the `<start>` token's probabilities).
    """
    if steps_per_octave not in (1, 2):
        raise ValueError(f"fake_quant_log2_ computes base-2 and base-sqrt(2) codes, got steps_per_octave={steps_per_octave}")
    smallest = max(2.0 ** -qmax(bits), torch.finfo(torch.float32).tiny)
    if fake_quant_kernel.fake_quant_log2_(p, scale, steps_per_octave, smallest, not at_most_scale, exact_first_column,
                                          LOG2_ROUNDING_CARRY, EXPONENT_BITS):
        return p
    first_column = p[..., :1].clone() if exact_first_column else None
    ratio = p.div_(scale)
    if steps_per_octave == 2:
        ratio.square_()
    ratio.view(torch.int32).add_(LOG2_ROUNDING_CARRY).bitwise_and_(EXPONENT_BITS)
    ratio.clamp_(min=smallest, max=None if at_most_scale else 1.0)
    if steps_per_octave == 2:
        ratio.sqrt_()
    ratio.mul_(scale)
    if first_column is not None:
        ratio[..., :1] = first_column
    return ratio


def dynamic_rowwise_params(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max parameters computed from `x` itself (the dynamic per-token baseline).

    The range always contains 0 so that zero padding stays exact, as in per-token int8 schemes.
    """
    lo = x.amin(dim=dim, keepdim=True).clamp_max(0)
    hi = x.amax(dim=dim, keepdim=True).clamp_min(0)
    return minmax_params(lo, hi, bits)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15) two per byte along the last dim: low nibble = even index.

    Args:
        codes (`torch.Tensor`): integer codes in [0, 15]; the last dim is padded with a zero code when odd.

    Returns:
        `torch.Tensor` of dtype uint8 with the last dim halved (rounded up).
    """
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4 got a code above 15; only 4-bit codes can be packed")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 codes with last dim `length`."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :length]


# Lp norm of the weight range search: the official code's (Q-Diffusion/BRECQ's `lp_loss(x, x_q, p=2.4)`), which
# weighs the largest errors a little more than squared error does.
WEIGHT_SEARCH_NORM = 2.4
# Elements of the candidate reconstructions one step of the range search holds (64 MB of float32).
SEARCH_CHUNK_ELEMENTS = 1 << 24


def weight_range_search(
    weight: torch.Tensor,
    bits: int,
    search_steps: int = 80,
    shrink_per_step: float = 0.01,
    norm: float = WEIGHT_SEARCH_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scale and zero point of a weight, its clipping range searched by the Lp error.

    For each output channel the range [min, max] is shrunk by `shrink_per_step` per candidate (`search_steps`
    candidates, as the Q-Diffusion/BRECQ initialisation does) and the candidate with the lowest `sum |w_q - w|^p`
    with nearest rounding is kept.

    Args:
        weight (`torch.Tensor`): Linear (out, in) or Conv2d (out, in, kh, kw) weight.
        bits (`int`): 8 or 4.
        search_steps (`int`): number of shrink candidates; 1 means plain min-max.
        shrink_per_step (`float`): fraction of the range removed per candidate.
        norm (`float`): p of the Lp error (`WEIGHT_SEARCH_NORM`).

    Returns:
        `(scale, zero_point)`: float32 `(out,)` tensors.
    """
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    w_min = flat.amin(dim=1)
    w_max = flat.amax(dim=1)
    # All candidates of a chunk in one pass (a few tensor ops per layer instead of a few per candidate), chunks
    # bounded in memory for SD's largest layers.
    keep = torch.tensor([1.0 - shrink_per_step * step for step in range(search_steps)], device=flat.device)
    chunk = max(1, SEARCH_CHUNK_ELEMENTS // max(1, flat.numel()))
    errors = []
    for start in range(0, search_steps, chunk):
        shrink = keep[start : start + chunk, None]
        scale, zero = minmax_params(w_min * shrink, w_max * shrink, bits)
        recon = fake_quant_uniform(flat, scale[..., None], zero[..., None], bits)
        errors.append((recon - flat).abs_().pow_(norm).sum(dim=-1))
    # The first candidate with the least error (argmin takes the first of equal minima), as a sequential search would.
    best = keep[torch.cat(errors).argmin(dim=0)]
    return minmax_params(w_min * best, w_max * best, bits)


def quantize_weight_per_channel(
    weight: torch.Tensor, bits: int, search_steps: int = 80, shrink_per_step: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric weight quantization with a searched clipping range (`weight_range_search`)
    and codes rounded to nearest.

    Returns:
        `(codes, scale, zero_point)`: uint8 codes shaped like `weight`, and float32 `(out,)` scale and zero point.
    """
    scale, zero_point = weight_range_search(weight, bits, search_steps, shrink_per_step)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    codes = quantize_uniform(flat, scale[:, None], zero_point[:, None], bits).to(torch.uint8)
    return codes.reshape(weight.shape), scale, zero_point
