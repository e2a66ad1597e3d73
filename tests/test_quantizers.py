"""Quantizer arithmetic: uniform round trips and error bounds, log2 values, 4-bit packing, weight search."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from dgq_core import fake_quant_kernel
from dgq_core.quantizers import (
    dequantize_log2,
    dequantize_uniform,
    fake_quant_log2,
    fake_quant_log2_,
    fake_quant_uniform,
    minmax_params,
    pack_int4,
    quantize_log2,
    quantize_uniform,
    quantize_weight_per_channel,
    unpack_int4,
)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_uniform_round_trip_error_is_at_most_half_a_step(bits):
    x = torch.randn(10_000) * 3 + 1
    scale, zero_point = minmax_params(x.min(), x.max(), bits)
    codes = quantize_uniform(x, scale, zero_point, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(codes, codes.round())
    error = (fake_quant_uniform(x, scale, zero_point, bits) - x).abs()
    assert error.max() <= scale / 2 + 1e-6 + scale * 1e-4 * 2**bits


def test_uniform_clamps_values_outside_the_range():
    scale, zero_point = minmax_params(torch.tensor(-1.0), torch.tensor(1.0), 8)
    out = fake_quant_uniform(torch.tensor([-5.0, 5.0]), scale, zero_point, 8)
    assert out[0] == pytest.approx(-1.0, abs=float(scale))
    assert out[1] == pytest.approx(1.0, abs=float(scale))


def test_log2_represents_powers_of_two_exactly_and_zero_as_the_smallest_level():
    scale = torch.tensor(0.5)
    exponents = torch.arange(0, 16, dtype=torch.float32)
    p = scale * torch.exp2(-exponents)
    assert torch.equal(quantize_log2(p, scale, 8), exponents)
    assert torch.equal(fake_quant_log2(p, scale, 8), p)
    zero_code = quantize_log2(torch.tensor([0.0]), scale, 6)
    assert zero_code.item() == 63
    assert dequantize_log2(zero_code, scale).item() == pytest.approx(0.5 * 2.0**-63)


@pytest.mark.parametrize("scale,zero_point", [(0.037, 117.0), (0.0123, 3.0), (0.001, 250.0)])
def test_uniform_codes_round_once_like_a_fused_multiply_add(scale, zero_point):
    # round(x * (1/s) + z) rounded to float32 once: float64 holds the product of two float32 exactly. An odd length
    # also covers the vectorized kernels' scalar tails. torch.quantize_per_tensor, the CPU integer path's
    # quantizer, rounds the same way.
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)) * 4
    scale, zero_point = torch.tensor(scale), torch.tensor(zero_point)
    fused = (x.double() * torch.reciprocal(scale).double() + zero_point.double()).float()
    codes = quantize_uniform(x, scale, zero_point, 8)
    assert torch.equal(codes, fused.round().clamp(0, 255))
    per_tensor = torch.quantize_per_tensor(x, float(scale), int(zero_point), torch.quint8).int_repr()
    assert torch.equal(codes, per_tensor.float())


def log_formula(p, scale, bits, steps_per_octave):
    """The log codes' values from log2/exp2: what the float-bits path is checked against."""
    return dequantize_log2(quantize_log2(p, scale, bits, steps_per_octave), scale, steps_per_octave)


@pytest.mark.parametrize("steps_per_octave", [1, 2])
@pytest.mark.parametrize("bits", [6, 8])
def test_log2_on_the_float_bits_matches_the_log2_exp2_formula(bits, steps_per_octave):
    scale = torch.tensor(0.37)
    # Ratios from 1 down to 2^-120 (normal floats), zeros, and values right at the rounding boundaries.
    p = scale * torch.exp2(-torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 120)
    boundary = scale * torch.tensor([2**-0.25, 2**-0.5, 2**-3.5]) * torch.tensor([1 - 1e-7, 1 + 1e-7])[:, None]
    p = torch.cat((p, boundary.flatten(), torch.zeros(3)))
    assert torch.equal(fake_quant_log2(p, scale, bits, steps_per_octave), log_formula(p, scale, bits, steps_per_octave))


@pytest.mark.parametrize("steps_per_octave", [1, 2])
def test_log2_on_the_float_bits_differs_from_the_formula_only_at_its_ties(steps_per_octave):
    """Every 211th float32 ratio in [2^-60, 1]: where the two disagree, the exact -k log2(ratio) is a code boundary
    (a half-integer) to float32 log2's precision, and the codes are neighbours."""
    first, last = (torch.tensor(value).view(torch.int32).item() for value in (2.0**-60, 1.0))
    ratio = torch.arange(first, last + 1, 211, dtype=torch.int32).view(torch.float32)
    scale = torch.tensor(1.0)
    fast = fake_quant_log2(ratio, scale, 8, steps_per_octave)
    formula = log_formula(ratio, scale, 8, steps_per_octave)
    differ = fast != formula
    assert differ.float().mean() < 1e-5
    exact = -steps_per_octave * torch.log2(ratio[differ].double())
    assert ((exact - exact.floor() - 0.5).abs() < 1e-5).all()
    code_steps = steps_per_octave * torch.log2(fast[differ].double() / formula[differ].double())
    assert torch.allclose(code_steps.abs(), torch.ones_like(code_steps))


def test_log2_relative_error_is_bounded():
    p = torch.rand(5000) * 0.9 + 0.01
    q = fake_quant_log2(p, torch.tensor(1.0), 8)
    ratio = q / p
    assert ratio.max() <= 2**0.5 + 1e-6 and ratio.min() >= 2**-0.5 - 1e-6


@pytest.mark.parametrize("length", [1, 7, 8, 33])
def test_int4_packing_round_trips_exactly(length):
    codes = torch.randint(0, 16, (5, length), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (length + 1) // 2)
    assert torch.equal(unpack_int4(packed, length), codes)


def test_int4_packing_layout_low_nibble_first():
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21


def test_int4_packing_rejects_wide_codes():
    with pytest.raises(ValueError, match="4-bit"):
        pack_int4(torch.tensor([16, 0]))


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_range_search_beats_plain_minmax(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    weight[:, 0] *= 20  # an outlier column stretches the min-max range
    codes, scale, zero_point = quantize_weight_per_channel(weight, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    # The search minimizes the L2.4 error (WEIGHT_SEARCH_NORM), which min-max is one candidate of.
    searched = (scale[:, None] * (codes.float() - zero_point[:, None]) - weight).abs().pow(2.4).sum()
    c1, s1, z1 = quantize_weight_per_channel(weight, bits, search_steps=1)
    minmax = (s1[:, None] * (c1.float() - z1[:, None]) - weight).abs().pow(2.4).sum()
    assert searched <= minmax
    if bits == 4:  # at 4 bits rounding error dominates, so clipping the outlier column must pay off
        assert searched < minmax


def test_weight_w8_is_close_to_full_precision():
    weight = torch.randn(32, 128)
    codes, scale, zero_point = quantize_weight_per_channel(weight, 8)
    recon = scale[:, None] * (codes.float() - zero_point[:, None])
    assert (recon - weight).abs().max() < 0.03


LAYOUTS = {  # input shape, and the dim the parameters vary along (None: one pair for the tensor)
    "conv channels": ((3, 40, 7, 9), 1),
    "linear channels": ((3, 35, 61), 2),
    "linear pixels": ((3, 35, 61), 1),
    "per tensor": ((5, 1001), None),
}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_one_pass_cpu_kernel_is_bit_identical_to_the_torch_ops(layout, bits):
    """`fake_quant_kernel` (what `fake_quant_uniform` runs on CPU float32) against the torch ops it replaces: exact
    halves (ties to even), values beyond the range, infinities, NaN, signed zeros, and a strided input."""
    shape, dim = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(0)
    size = 1 if dim is None else shape[dim]
    scale = torch.rand(size, generator=generator) * 0.1 + 0.01
    zero_point = torch.randint(-3, 2**bits + 3, (size,), generator=generator).float()  # some beyond the code range
    view = [1] * len(shape)
    if dim is not None:
        view[dim] = -1
    scale, zero_point = scale.view(view), zero_point.view(view)
    x = torch.randn(shape, generator=generator) * 3
    halves = (torch.randint(-40, 40, shape, generator=generator) + 0.5) * scale  # x / s lands on .5 (up to rounding)
    x = torch.where(torch.rand(shape, generator=generator) < 0.3, halves, x)
    x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30])
    inverse = torch.reciprocal(scale)
    assert fake_quant_kernel.library() is not None, "this machine's C compiler built the kernel"
    for tensor in (x, x.transpose(-1, -2).contiguous().transpose(-1, -2)):
        fused = fake_quant_kernel.fake_quant(tensor, scale, zero_point, inverse, 2**bits - 1)
        ops = quantize_uniform(tensor, scale, zero_point, bits, inverse).sub_(zero_point).mul_(scale)
        assert fused is not None
        assert torch.equal(fused.view(torch.int32), ops.contiguous().view(torch.int32)), "bit for bit, NaN too"
        assert torch.equal(fake_quant_uniform(tensor, scale, zero_point, bits, inverse).view(torch.int32),
                           fused.view(torch.int32))


@pytest.mark.parametrize("steps_per_octave", [1, 2])
@pytest.mark.parametrize("exact_first_column", [False, True])
@pytest.mark.parametrize("at_most_scale", [True, False])
def test_the_one_pass_log_kernel_is_bit_identical_to_the_torch_ops(steps_per_octave, exact_first_column,
                                                                   at_most_scale):
    """`fake_quant_kernel.fake_quant_log2_` (what `fake_quant_log2_` runs on a contiguous CPU tensor) against the
    torch ops it replaces, run on a strided copy: per-sample and single scales, zeros, subnormal and tiny ratios,
    values above the scale, and the first column left exact."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.exp2(-torch.rand(3, 4, 9, 13, generator=generator) * 40)
    probs.view(-1)[:5] = torch.tensor([0.0, 1e-45, 1e-38, 3.0, 1.0])
    probs[:, :, :, 0] *= 7  # a <start> column above the scale
    for scale in (torch.rand(3, 1, 1, 1, generator=generator) + 0.2, torch.tensor(0.6)):
        strided = probs.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous: the torch ops
        fused = fake_quant_log2_(probs.clone(), scale, 6, at_most_scale, steps_per_octave, exact_first_column)
        ops = fake_quant_log2_(strided, scale, 6, at_most_scale, steps_per_octave, exact_first_column)
        assert not strided.is_contiguous()
        assert torch.equal(fused.view(torch.int32), ops.contiguous().view(torch.int32))
        assert torch.equal(fused[..., 0], probs[..., 0]) == exact_first_column
        assert not torch.equal(fused[..., 1:], probs[..., 1:]), "quantized"


def test_the_one_pass_kernel_leaves_autograd_and_other_dtypes_to_the_torch_ops():
    scale, zero_point = torch.tensor([0.1]), torch.tensor([3.0])
    inverse = torch.reciprocal(scale)
    assert fake_quant_kernel.fake_quant(torch.randn(8, requires_grad=True), scale, zero_point, inverse, 255) is None
    assert fake_quant_kernel.fake_quant(torch.randn(8).double(), scale, zero_point, inverse, 255) is None
    two_dims = torch.rand(4, 8) + 0.1  # parameters varying along two dims: not one index per dim
    assert fake_quant_kernel.fake_quant(torch.randn(4, 8), two_dims, two_dims, 1 / two_dims, 255) is None


def test_without_a_working_compiler_fake_quantization_falls_back_to_the_torch_ops(tmp_path):
    """A failing C compiler (here `false`) leaves the kernel out, logged, and `fake_quant_uniform` still gives the
    torch ops' numbers; nothing is left in the cache directory."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from dgq_core import fake_quant_kernel\n"
        "from dgq_core.quantizers import dequantize_log2, fake_quant_log2, fake_quant_uniform, quantize_log2, quantize_uniform\n"
        "x, s, z = torch.randn(4, 5), torch.tensor(0.05), torch.tensor(7.0)\n"
        "assert fake_quant_kernel.library() is None\n"
        "assert torch.equal(fake_quant_uniform(x, s, z, 8), quantize_uniform(x, s, z, 8).sub_(z).mul_(s))\n"
        "p = torch.rand(3, 5) * s\n"
        "assert torch.equal(fake_quant_log2(p, s, 8), dequantize_log2(quantize_log2(p, s, 8), s))\n"
    )
    env = {**os.environ, "CC": shutil.which("false"), "DGQ_KERNEL_CACHE": str(tmp_path / "kernels")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fake quantization runs as torch ops: building its kernel failed" in result.stderr
    assert not any((tmp_path / "kernels").glob("*.so"))


@pytest.mark.parametrize("per_row", [True, False])
def test_the_one_pass_dequantization_is_bit_identical_to_the_torch_ops(per_row):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (37, 203), generator=generator, dtype=torch.uint8)
    rows = 37 if per_row else 1
    scale = (torch.rand(rows, 1, generator=generator) * 0.1 + 1e-3).reshape(-1, 1)
    zero_point = torch.randint(-5, 260, (rows, 1), generator=generator).float()
    fused = fake_quant_kernel.dequantize(codes, scale, zero_point)
    assert fused is not None
    assert torch.equal(fused.view(torch.int32), (scale * (codes.float() - zero_point)).view(torch.int32))


def test_torch_compile_traces_fake_quantization_as_one_graph_of_the_torch_ops():
    """Dynamo cannot trace the kernels' foreign calls, so inside a compiled graph fake quantization, dequantization
    and the log codes take the torch ops: one graph, no break, and the eager numbers (the "eager" backend adds no
    code generation of its own)."""
    generator = torch.Generator().manual_seed(0)
    x, probs = torch.randn(64, 32, generator=generator), torch.rand(2, 4, 16, 16, generator=generator)
    codes = torch.randint(0, 256, (8, 32), generator=generator, dtype=torch.uint8)
    scale, zero_point = torch.tensor(0.05), torch.tensor(7.0)

    def quantize(x, probs, codes):
        return (
            fake_quant_uniform(x, scale, zero_point, 8),
            fake_quant_log2_(probs.clone(), torch.tensor(0.9), 8, True, 2, True),
            dequantize_uniform(codes, scale, zero_point),
        )

    explanation = torch._dynamo.explain(quantize)(x, probs, codes)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(quantize, backend="eager")(x, probs, codes)
    for traced, eager in zip(compiled, quantize(x, probs, codes), strict=True):
        assert torch.equal(traced, eager)
