"""Fake quantization of a CPU float32 tensor, and dequantization of uint8 codes, in one pass each: the reference's
numbers at the cost of one copy.

`quantizers.fake_quant_uniform` written with torch ops reads and writes its input five times (fused multiply-add,
round, clamp, subtract, multiply); on the bundled model's small activations that was a third of a denoising step.
`fake_quant` does the same IEEE operations per element, in the same order -- `fmaf(x, 1/s, z)`, round half to even,
clamp to [0, 2^b - 1], `(q - z) * s` -- so its output is bit-identical (tests/test_quantizers.py checks it), in one
read and one write. `fake_quant_log2_` does `quantizers.fake_quant_log2_`'s float-bit log rounding of the attention
probabilities in place in one pass where the torch ops take five to seven, skipping the exact `<start>` column
instead of saving and restoring it. `dequantize` does `(float(q) - z) * s` from the codes as
`quantizers.dequantize_uniform` does, where the torch ops convert, subtract and multiply in three passes (the fake
path dequantizes every weight at every call, since no floating-point copy stays resident).

It is C compiled at first use for the machine's own CPU (`-march=native`, no fast-math, no contraction beyond the
explicit `fmaf`) by `native.build`. Without a compiler, or where it fails, it is not used and the torch ops run
instead (logged once).
"""

from __future__ import annotations

import ctypes

import torch

from . import native

SOURCE = r"""
#include <math.h>
#include <stdint.h>

static inline float fake_quant(float x, float scale, float inverse, float zero_point, float qmax) {
    /* rint rounds half to even in the default rounding mode, as torch.round does; unlike roundeven it vectorizes */
    float q = __builtin_rintf(fmaf(x, inverse, zero_point));
    q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
    return (q - zero_point) * scale;
}

/* x and out: (outer, n, inner) contiguous; scale, inverse, zero_point: (n,). */
void fake_quant_f32(const float *restrict x, float *restrict out, const float *restrict scale,
                    const float *restrict inverse, const float *restrict zero_point, int64_t outer, int64_t n,
                    int64_t inner, float qmax) {
    for (int64_t o = 0; o < outer; ++o) {
        const float *xo = x + o * n * inner;
        float *yo = out + o * n * inner;
        if (inner == 1) {
            for (int64_t c = 0; c < n; ++c) yo[c] = fake_quant(xo[c], scale[c], inverse[c], zero_point[c], qmax);
            continue;
        }
        for (int64_t c = 0; c < n; ++c) {
            const float s = scale[c], v = inverse[c], z = zero_point[c];
            const float *xc = xo + c * inner;
            float *yc = yo + c * inner;
            for (int64_t i = 0; i < inner; ++i) yc[i] = fake_quant(xc[i], s, v, z, qmax);
        }
    }
}

/* quantizers.fake_quant_log2_ in place: p (n, rows, row) contiguous; scale: (n,). Column 0 of every row is left as
   it is when skip_first (the exact <start> token). carry and exponent: the float-bit rounding's constants. */
void fake_quant_log2_f32(float *restrict p, const float *restrict scale, int64_t n, int64_t rows, int64_t row,
                         int32_t steps_per_octave, float smallest, int32_t clamp_to_one, int32_t skip_first,
                         uint32_t carry, uint32_t exponent) {
    for (int64_t c = 0; c < n; ++c) {
        const float s = scale[c];
        for (int64_t r0 = 0; r0 < rows; ++r0) {
            float *pr = p + (c * rows + r0) * row;
            for (int64_t i = skip_first ? 1 : 0; i < row; ++i) {
                float r = pr[i] / s;
                if (steps_per_octave == 2) r = r * r;
                uint32_t bits;
                __builtin_memcpy(&bits, &r, 4);
                bits = (bits + carry) & exponent;
                __builtin_memcpy(&r, &bits, 4);
                r = r < smallest ? smallest : r;
                if (clamp_to_one) r = r > 1.0f ? 1.0f : r;
                if (steps_per_octave == 2) r = sqrtf(r);
                pr[i] = r * s;
            }
        }
    }
}

/* codes and out: (n, inner) contiguous; scale, zero_point: (n,). */
void dequantize_u8(const uint8_t *restrict codes, float *restrict out, const float *restrict scale,
                   const float *restrict zero_point, int64_t n, int64_t inner) {
    for (int64_t c = 0; c < n; ++c) {
        const float s = scale[c], z = zero_point[c];
        const uint8_t *qc = codes + c * inner;
        float *yc = out + c * inner;
        for (int64_t i = 0; i < inner; ++i) yc[i] = ((float)qc[i] - z) * s;
    }
}
"""
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-lm"]


def _build() -> ctypes.CDLL | None:
    loaded = native.build("fake_quant", SOURCE, FLAGS, "fake quantization runs as torch ops")
    if loaded is None:
        return None
    loaded.fake_quant_f32.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_float]
    loaded.dequantize_u8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    loaded.fake_quant_log2_f32.argtypes = (
        [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int32, ctypes.c_float] + [ctypes.c_int32] * 2
        + [ctypes.c_uint32] * 2
    )
    loaded.fake_quant_f32.restype = loaded.dequantize_u8.restype = loaded.fake_quant_log2_f32.restype = None
    return loaded


_LIBRARY = native.BuiltOnce(_build)


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built at the first call; None where it cannot be, and while torch.compile traces (it
    cannot trace a foreign call: its graphs take the torch ops, which it fuses itself)."""
    if torch.compiler.is_compiling():
        return None
    return _LIBRARY.get()


def _cpu_float32(*parameters: torch.Tensor) -> bool:
    """Whether every parameter is a CPU float32 tensor outside autograd, as the kernels read them."""
    return all(p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad for p in parameters)


def _layout(x: torch.Tensor, parameter: torch.Tensor) -> tuple[int, int, int] | None:
    """(outer, n, inner) of `x` when `parameter` holds one value per index along at most one of its dims."""
    if parameter.dim() > x.dim():
        return None
    shape = (1,) * (x.dim() - parameter.dim()) + tuple(parameter.shape)
    varying = [dim for dim, size in enumerate(shape) if size != 1]
    if not varying:
        return 1, 1, x.numel()
    if len(varying) > 1 or shape[varying[0]] != x.shape[varying[0]]:
        return None
    dim = varying[0]
    return x.shape[:dim].numel(), x.shape[dim], x.shape[dim + 1 :].numel()


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, inverse_scale: torch.Tensor, qmax: int
) -> torch.Tensor | None:
    """`quantizers.fake_quant_uniform`'s result in one pass (contiguous), or None where this kernel does not apply
    (not a CPU float32 tensor without autograd, parameters not per index along one dim, no compiled kernel)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    parameters = (scale, inverse_scale, zero_point)
    if not _cpu_float32(*parameters):
        return None
    layout = _layout(x, scale)
    if layout is None or any(p.shape != scale.shape for p in parameters[1:]):
        return None
    compiled = library()
    if compiled is None:
        return None
    scale, inverse_scale, zero_point = (p.reshape(-1).contiguous() for p in parameters)
    x = x.contiguous()  # a strided view (heads split from tokens) costs one copy more, still fewer than the ops
    out = torch.empty_like(x)
    compiled.fake_quant_f32(
        x.data_ptr(), out.data_ptr(), scale.data_ptr(), inverse_scale.data_ptr(), zero_point.data_ptr(),
        *layout, float(qmax),
    )
    return out


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor | None:
    """`quantizers.dequantize_uniform`'s float32 result in one pass, or None where this kernel does not apply (not
    contiguous CPU uint8 codes with float32 parameters per row or for the whole tensor, no compiled kernel)."""
    if codes.device.type != "cpu" or codes.dtype != torch.uint8 or not codes.is_contiguous() or codes.dim() == 0:
        return None
    if not _cpu_float32(scale, zero_point):
        return None
    layout = _layout(codes, scale)
    if layout is None or zero_point.shape != scale.shape or layout[0] != 1:
        return None
    compiled = library()
    if compiled is None:
        return None
    _, rows, inner = layout
    scale, zero_point = (p.reshape(-1).contiguous() for p in (scale, zero_point))
    out = torch.empty(codes.shape, dtype=torch.float32)
    compiled.dequantize_u8(codes.data_ptr(), out.data_ptr(), scale.data_ptr(), zero_point.data_ptr(), rows, inner)
    return out


def fake_quant_log2_(
    p: torch.Tensor, scale: torch.Tensor, steps_per_octave: int, smallest: float, clamp_to_scale: bool,
    exact_first_column: bool, carry: int, exponent: int,
) -> bool:
    """`quantizers.fake_quant_log2_` on `p` in place, in one pass; False (and `p` untouched) where this kernel does
    not apply (not a contiguous CPU float32 tensor without autograd, `scale` not per index of `p`'s first dim or one
    value, no compiled kernel).

    Args:
        exact_first_column (`bool`): leave `p[..., 0]` as it is.
        carry, exponent (`int`): `quantizers.LOG2_ROUNDING_CARRY` and `EXPONENT_BITS`.
    """
    if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous() or p.dim() == 0:
        return False
    if (p.requires_grad and torch.is_grad_enabled()) or not _cpu_float32(scale):
        return False
    layout = _layout(p, scale)
    if layout is None or layout[0] != 1:
        return False
    compiled = library()
    if compiled is None:
        return False
    _, n, inner = layout
    row = p.shape[-1]
    if inner % row:  # a scale per column
        return False
    scale = scale.reshape(-1).contiguous()
    compiled.fake_quant_log2_f32(
        p.data_ptr(), scale.data_ptr(), n, inner // row, row, steps_per_octave, smallest, int(clamp_to_scale),
        int(exact_first_column), carry, exponent,
    )
    return True
