"""CPU attention with DGQ's quantized probabilities (AVX-512, C in `cpu_attention.c`): one C call per attention
call, where the reference attention makes six passes over the scores with torch ops.

The reference (`dgq_core.attention.ExplicitAttnProcessor`) writes `scale * q k^T` into a scores tensor (64 MB for
SD's 1024-token self-attention at batch 2), then reads and writes it again for the softmax, the per-sample maximum,
the log quantization and the product with V. The kernel computes what `triton_attention` does on CUDA, in the same
two passes, with register tiles of 8 query rows:

1. Per query row: the scores (tiles of 8 rows x 48 keys, FP32 FMA over the head dim from K^T packed once per call),
   their maximum `m`, the exponentials `e = exp(x - m)` and their sum `l`, and the row's largest quantized
   probability. The exponentials stay in memory for the second pass (`exps`), for as many (sample, head) planes as
   fit the processor's scores budget; the planes beyond it are computed again in the second pass. The sample's
   scale (Eq. 8) is the largest of its rows'.
2. Per query row: `p = e / l`, quantized with the sample's scale (the float-bit log2 rounding of
   `quantizers.fake_quant_log2_`, log-sqrt2 or uniform codes), the `<start>` column exact, then multiplied with V in
   tiles of 8 rows x 48 head dims.

Agreement with the reference: the same codes, except where a probability lies within float32 rounding of a code
boundary: the kernel sums the scores' dot products and the softmax denominator in another order, takes its
exponentials from a polynomial (within 1 ulp of glibc's expf) and multiplies by `1 / l` and `1 / s` where the
reference divides (`tests/test_kernels.py` checks that every differing code is such a tie, as for the Triton
kernel). A row's result depends only on its own sample: a batch changes which planes are kept, and kept or computed
again the exponentials are the same floats.

Built by `native.build` at first use where the CPU has AVX-512 (its foundation instructions); `available()` says
whether it can run.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import native
from ..attention import DEFAULT_SCORES_BUDGET_BYTES, PROB_QUANTIZER_IDS, reusable_buffer
from ..quantizers import EXPONENT_BITS, LOG2_ROUNDING_CARRY, qmax

SOURCE = Path(__file__).with_name("cpu_attention.c").read_text()
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-lm"]
# The C kernel's padding of the keys (a vector of float32).
LANES = 16
REQUIRED_FLAGS = ("avx512f",)
# `attention.reusable_buffer` names of the packed keys and of the exponentials kept between the passes.
KEYS_BUFFER, EXPONENTIALS_BUFFER = "cpu_attention_keys", "cpu_attention_exponentials"


def build() -> ctypes.CDLL | None:
    """Compile (or load from the cache) the kernel for this CPU; None where it lacks AVX-512 or the build fails."""
    if not set(REQUIRED_FLAGS) <= native.cpu_flags():
        return None
    loaded = native.build("cpu_attention", SOURCE, FLAGS, "DGQ attention runs as the reference's torch ops")
    if loaded is None:
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    loaded.dgq_attention_f32.argtypes = (
        [pointer] * 7 + [i64] * 14 + [ctypes.c_float] * 2 + [i32] * 2 + [i64] + [ctypes.c_uint32] * 2
    )
    loaded.dgq_attention_f32.restype = ctypes.c_int32
    return loaded


_LIBRARY = native.BuiltOnce(build)


def available() -> bool:
    """Whether this machine runs the CPU attention kernel."""
    return _LIBRARY.get() is not None


def dgq_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    bits: int,
    quantizer: str = "log2",
    keep_start: bool = False,
    scores_budget_bytes: int = DEFAULT_SCORES_BUDGET_BYTES,
) -> torch.Tensor:
    """DGQ attention `P^ V` with P^ the per-sample quantized probabilities of `softmax(scale * q k^T)`: what
    `DGQAttnProcessor._attend` computes for method "dgq" without a mask, in one C call.

    Args:
        query (`torch.Tensor`): (B, heads, queries, head_dim) on the CPU, quantized; any strides with a unit last
            one. Other dtypes than float32 are computed in float32.
        key, value (`torch.Tensor`): (B, heads, keys, head_dim), quantized (the `<start>` key exact).
        scale (`float`): the score scale (`attn.scale`).
        bits (`int`): probability code width.
        quantizer (`str`): "log2", "log-sqrt2" or "uniform" (`QuantConfig.prob_quantizer`).
        keep_start (`bool`): key 0 (`<start>`) keeps its exact probability and is left out of the scale.
        scores_budget_bytes (`int`): the most bytes of exponentials kept between the passes (the processor's
            `scores_budget_bytes`); planes beyond it are computed twice.

    Returns:
        `torch.Tensor`: (B, heads, queries, head_dim) in `value`'s dtype, a view of a (B, queries, heads, head_dim)
        tensor, so that merging the heads is free.
    """
    library = _LIBRARY.get()
    if library is None:
        raise RuntimeError("the CPU attention kernel needs AVX-512 and a C compiler (see `available()`)")
    batch, heads, n_queries, head_dim = query.shape
    n_keys = key.shape[2]
    dtype = value.dtype
    query, key, value = ((t if t.stride(-1) == 1 else t.contiguous()).float() for t in (query, key, value))
    out = torch.empty(batch, n_queries, heads, head_dim)
    if out.numel() == 0 or n_keys == 0:
        return out.zero_().to(dtype).transpose(1, 2)
    padded = -(-n_keys // LANES) * LANES
    row_floats = padded + LANES  # cpu_attention.c: the exponentials' row stride
    plane_bytes = 4 * n_queries * row_floats
    stored_planes = min(batch * heads, scores_budget_bytes // plane_bytes)
    keys_t = reusable_buffer(KEYS_BUFFER, batch * heads * head_dim * padded, query)
    exps = reusable_buffer(EXPONENTIALS_BUFFER, stored_planes * n_queries * row_floats, query)
    stats = torch.empty(3 * batch * heads * n_queries)
    status = library.dgq_attention_f32(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), keys_t.data_ptr(), exps.data_ptr(),
        stats.data_ptr(), batch, heads, n_queries, n_keys, head_dim,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], float(scale), float(qmax(bits)),
        PROB_QUANTIZER_IDS[quantizer], int(keep_start), stored_planes, LOG2_ROUNDING_CARRY, EXPONENT_BITS,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its per-thread tiles")
    return out.to(dtype).transpose(1, 2)
