"""CUDA attention with DGQ's quantized probabilities (Triton): flash-style tiles over the keys, no probability matrix
in memory.

DGQ quantizes the attention probabilities with one dynamic scale per sample, `s = max P` over every head, query and
key of the sample (`<start>` left out where it is kept exact: paper Eq. 8). That scale needs every row's softmax
before any row can be quantized, so the attention runs in two launches over the same key tiles:

1. `_row_statistics`: per query row the running maximum `m` and sum `l` of the scores' exponentials (an online
   softmax), and the row's largest probability `exp(m' - m) / l` (`m'`: the largest score but the `<start>` key's
   when it is kept exact; else `1 / l`). The sample's scale is the maximum of its rows' (one small reduction).
2. `_quantized_attention`: the probabilities again, `p = exp(x - m) / l`, quantized in registers with the sample's
   scale (log2, log-sqrt2 or uniform codes, the arithmetic of `dgq_core.quantizers`), the `<start>` column exact,
   and multiplied with the values tile by tile.

Scores are `scale * q k^T` of the quantized (fake-quant, float) Q and K, as the reference processor computes them;
what the kernels keep per row is three floats, so memory grows with the queries, not with queries x keys. The
output is written with the heads merged, (B, queries, heads * head_dim), so the output projection reads it in place.

Agreement with the reference processor (`dgq_core.attention.ExplicitAttnProcessor`): the same codes, except where a
probability lies within float32 rounding of a code boundary. The kernel sums the softmax denominator in another
order (online, tile by tile), multiplies by `1 / l` and `1 / s` where the reference divides, and on the GPU takes
the exponential and the dots from other instructions; each moves a probability by a few units in the last place,
which changes its code only next to a boundary (`tests/test_kernels.py` checks that every differing code is such a
tie). On CPU tensors the same source runs in Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests
check it; on the GPU the dots run on tensor cores in `DOT_PRECISION` ("tf32x3": three TF32 products, about FP32's
accuracy). **Not yet measured on a GPU** (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..attention import PROB_QUANTIZER_IDS
from ..quantizers import EXPONENT_BITS, LOG2_ROUNDING_CARRY, qmax
from .triton_fused import check_triton_device

_CARRY = tl.constexpr(LOG2_ROUNDING_CARRY)
_EXPONENT = tl.constexpr(EXPONENT_BITS)
# 2^23: adding it to a float32 in [0, 2^23) rounds to an integer, ties to even (torch.round's rule).
_ROUNDING_MAGIC = tl.constexpr(8388608.0)
_SMALLEST_NORMAL = tl.constexpr(torch.finfo(torch.float32).tiny)

# Three TF32 tensor-core products per dot (big x big + big x small + small x big): about FP32's accuracy at tensor-core
# speed; "ieee" would be exact FP32 FMA on the CUDA cores, "tf32" one product (10-bit mantissas: codes then move).
DOT_PRECISION = "tf32x3"


@triton.jit
def _scores(q, k_ptr, k_row_stride, cols, dims, n_keys, head_dim, scale, PRECISION: tl.constexpr):
    """`scale * q k^T` of one (BM, BN) tile; keys beyond `n_keys` score -inf."""
    k_mask = (cols[None, :] < n_keys) & (dims[:, None] < head_dim)
    k = tl.load(k_ptr + cols[None, :].to(tl.int64) * k_row_stride + dims[:, None], mask=k_mask, other=0.0)
    scores = tl.dot(q, k.to(tl.float32), input_precision=PRECISION) * scale
    return tl.where(cols[None, :] < n_keys, scores, float("-inf"))


@triton.jit
def _load_queries(q_ptr, stride_qb, stride_qh, stride_qm, batch, head, rows, dims, n_queries, head_dim):
    base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    mask = (rows[:, None] < n_queries) & (dims[None, :] < head_dim)
    return tl.load(base + rows[:, None].to(tl.int64) * stride_qm + dims[None, :], mask=mask, other=0.0).to(tl.float32)


# The switches are run-time arguments, not specialized on their values: one compiled kernel serves every checkpoint
# and attention (a warp-uniform branch costs next to nothing).
@triton.jit(do_not_specialize=["keep_start"])
def _row_statistics(
    q_ptr, k_ptr, stats_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    heads, n_queries, n_keys, head_dim, scale, keep_start,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Per query row of one (sample, head): `m` (largest score), `1 / l` (l: the sum of exp(score - m)) and the
    row's largest quantized-column probability, written to stats[0], stats[1], stats[2] at row (b * heads + h) *
    n_queries + i."""
    pid_bh = tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    q = _load_queries(q_ptr, stride_qb, stride_qh, stride_qm, batch, head, rows, dims, n_queries, head_dim)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    quantized_max = tl.full((BM,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BM,), tl.float32)
    for start in range(0, n_keys, BN):
        cols = start + tl.arange(0, BN)
        scores = _scores(q, k_base, stride_kn, cols, dims, n_keys, head_dim, scale, PRECISION)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(scores - new_max[:, None]), axis=1)
        row_max = new_max
        quantized = cols[None, :] >= keep_start
        quantized_max = tl.maximum(quantized_max, tl.max(tl.where(quantized, scores, float("-inf")), axis=1))
    inv_sum = tl.math.div_rn(1.0, row_sum)
    largest = tl.exp(quantized_max - row_max) * inv_sum
    offsets = pid_bh.to(tl.int64) * n_queries + rows
    plane = tl.num_programs(1).to(tl.int64) * n_queries
    ok = rows < n_queries
    tl.store(stats_ptr + offsets, row_max, mask=ok)
    tl.store(stats_ptr + plane + offsets, inv_sum, mask=ok)
    tl.store(stats_ptr + 2 * plane + offsets, largest, mask=ok)


@triton.jit(do_not_specialize=["quantizer", "keep_start"])
def _quantized_attention(
    q_ptr, k_ptr, v_ptr, stats_ptr, sample_scale_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    heads, n_queries, n_keys, head_dim, scale, qmax, quantizer, keep_start,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """out = P^ V for one (BM queries, sample, head) tile, P^ the quantized probabilities (module docstring)."""
    pid_bh = tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    row_ok = rows < n_queries
    q = _load_queries(q_ptr, stride_qb, stride_qh, stride_qm, batch, head, rows, dims, n_queries, head_dim)
    offsets = pid_bh.to(tl.int64) * n_queries + rows
    plane = tl.num_programs(1).to(tl.int64) * n_queries
    row_max = tl.load(stats_ptr + offsets, mask=row_ok, other=0.0)
    inv_sum = tl.load(stats_ptr + plane + offsets, mask=row_ok, other=0.0)
    sample_scale = tl.load(sample_scale_ptr + batch)
    # The quantizer's constants, as dgq_core.quantizers computes them: 1 / s, and for uniform codes the step s / qmax
    # (floored at the smallest normal float) and its reciprocal; log codes reach at most 2^-qmax (and 2^-126).
    inv_scale = tl.math.div_rn(1.0, sample_scale)
    step = tl.maximum(tl.math.div_rn(sample_scale, qmax), _SMALLEST_NORMAL)
    inv_step = tl.math.div_rn(1.0, step)
    smallest = tl.maximum(tl.exp2(-qmax), _SMALLEST_NORMAL)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    acc = tl.zeros((BM, BD), tl.float32)
    for start in range(0, n_keys, BN):
        cols = start + tl.arange(0, BN)
        scores = _scores(q, k_base, stride_kn, cols, dims, n_keys, head_dim, scale, PRECISION)
        probs = tl.exp(scores - row_max[:, None]) * inv_sum[:, None]
        if quantizer == 2:  # uniform codes round(p / step), clamped to [0, qmax]
            codes = tl.minimum(tl.maximum(probs * inv_step, 0.0), qmax)
            quantized = ((codes + _ROUNDING_MAGIC) - _ROUNDING_MAGIC) * step
        else:  # 2^round(log2 r) of r = (p / s)^k on the float bits (quantizers.fake_quant_log2_)
            ratio = probs * inv_scale
            if quantizer == 1:
                ratio = ratio * ratio
            rounded = ((ratio.to(tl.int32, bitcast=True) + _CARRY) & _EXPONENT).to(tl.float32, bitcast=True)
            rounded = tl.minimum(tl.maximum(rounded, smallest), 1.0)
            if quantizer == 1:
                rounded = tl.sqrt_rn(rounded)
            quantized = rounded * sample_scale
        quantized = tl.where(cols[None, :] < keep_start, probs, quantized)
        quantized = tl.where(cols[None, :] < n_keys, quantized, 0.0)
        v_mask = (cols[:, None] < n_keys) & (dims[None, :] < head_dim)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + dims[None, :], mask=v_mask, other=0.0)
        acc = tl.dot(quantized, v.to(tl.float32), acc, input_precision=PRECISION)
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    out_mask = row_ok[:, None] & (dims[None, :] < head_dim)
    tl.store(out_base + rows[:, None].to(tl.int64) * stride_om + dims[None, :], acc, mask=out_mask)


@dataclass(frozen=True)
class Tiles:
    """One launch's tiling: `queries` x `keys` score tiles over `dims` head dims (the head dim padded to a power of
    two; tensor-core dots need 16 at least), with `warps` warps and `stages` software-pipelined key tiles."""

    queries: int
    keys: int
    dims: int
    warps: int = 4
    stages: int = 2


def launch_tiles(head_dim: int) -> tuple[Tiles, Tiles]:
    """The tiles of `_row_statistics` and of `_quantized_attention` for a head dim.

    Chosen without a GPU from ptxas's report for sm_90a (`bench/gpu_check.py` times them): large tiles whose FP32
    Q tile, accumulator and TF32x3 operand splits (nearly) fit the 255 registers of a thread and whose shared memory
    fits Hopper's 227 KiB. Head dims up to 64 (SD's 40, SDXL's 64) spill nothing; SD's 80 and 160 (padded to 128
    and 256) spill 36 and 28 bytes in the second kernel; larger tiles spill hundreds.
    """
    dims = max(16, triton.next_power_of_2(head_dim))
    if dims <= 64:
        return Tiles(64, 64, dims), Tiles(64, 64, dims)
    if dims <= 128:
        return Tiles(64, 32, dims), Tiles(64, 32, dims)
    return Tiles(16, 32, dims), Tiles(16, 16, dims)


def dgq_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    bits: int,
    quantizer: str = "log2",
    keep_start: bool = False,
    precision: str = DOT_PRECISION,
    scores_budget_bytes: int | None = None,
) -> torch.Tensor:
    """DGQ attention `P^ V` with P^ the per-sample quantized probabilities of `softmax(scale * q k^T)`.

    What `DGQAttnProcessor._attend` computes for method "dgq" without a mask, in two launches and without
    materializing the probabilities.

    Args:
        query (`torch.Tensor`): (B, heads, queries, head_dim), quantized; any strides with a unit last one.
        key, value (`torch.Tensor`): (B, heads, keys, head_dim), quantized (the `<start>` key exact).
        scale (`float`): the score scale (`attn.scale`).
        bits (`int`): probability code width.
        quantizer (`str`): "log2", "log-sqrt2" or "uniform" (`QuantConfig.prob_quantizer`).
        keep_start (`bool`): key 0 (`<start>`) keeps its exact probability and is left out of the scale.
        precision (`str`): Triton's `input_precision` of the dots on the GPU (the interpreter computes in FP32).
        scores_budget_bytes (`int | None`): the processor's scores budget, which every call meets: the kernels keep
            three floats per query row (the signature is that of every fused attention, `cpu_attention`'s too).

    Returns:
        `torch.Tensor`: (B, heads, queries, head_dim) in `value`'s dtype, a view of a (B, queries, heads, head_dim)
        tensor, so that merging the heads is free.
    """
    check_triton_device(query.device)
    batch, heads, n_queries, head_dim = query.shape
    n_keys = key.shape[2]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(batch, n_queries, heads, head_dim, dtype=value.dtype, device=query.device)
    if out.numel() == 0:
        return out.transpose(1, 2)
    stats_tiles, attention_tiles = launch_tiles(head_dim)
    stats = torch.empty(3, batch * heads * n_queries, dtype=torch.float32, device=query.device)
    q_strides, k_strides, v_strides = query.stride()[:3], key.stride()[:3], value.stride()[:3]
    _row_statistics[(triton.cdiv(n_queries, stats_tiles.queries), batch * heads)](
        query, key, stats, *q_strides, *k_strides, heads, n_queries, n_keys, head_dim, float(scale), int(keep_start),
        PRECISION=precision, BM=stats_tiles.queries, BN=stats_tiles.keys,
        BD=stats_tiles.dims, num_warps=stats_tiles.warps, num_stages=stats_tiles.stages,
    )  # fmt: skip
    sample_scale = stats[2].view(batch, -1).amax(dim=1)
    _quantized_attention[(triton.cdiv(n_queries, attention_tiles.queries), batch * heads)](
        query, key, value, stats, sample_scale, out, *q_strides, *k_strides, *v_strides,
        out.stride(0), out.stride(2), out.stride(1), heads, n_queries, n_keys, head_dim, float(scale),
        float(qmax(bits)), PROB_QUANTIZER_IDS[quantizer], int(keep_start), PRECISION=precision,
        BM=attention_tiles.queries, BN=attention_tiles.keys, BD=attention_tiles.dims,
        num_warps=attention_tiles.warps, num_stages=attention_tiles.stages,
    )  # fmt: skip
    return out.transpose(1, 2)
