"""Integer executors vs the fake-quant reference, per layer type and activation mode, W8/W4, A8/A6; the fused
attention kernels (CUDA's, in Triton's interpreter, and the CPU's C kernel) vs the reference attention processor.

All four backends are checked on CPU: the fused VNNI kernel (CPUs with AVX-512 VNNI; also built without VBMI2, as on
Cascade Lake), oneDNN (the other CPUs), `torch._int_mm` (the CUDA fallback's code, run on CPU tensors) and the fused
Triton kernel (the CUDA backend, run in Triton's interpreter), and so is the Triton attention kernel; both Triton
kernels are also compiled for sm_90 and sm_80.
They must match fake quantization to float rounding for every width: `_int_mm`, the Triton kernel and oneDNN with
VNNI accumulate in int32, and oneDNN without VNNI splits the codes that could saturate its int16 pair sums (checked
under `ONEDNN_MAX_CPU_ISA=AVX2`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dgq_core.attention import LOG_CODE_STEPS_PER_OCTAVE, DGQAttnProcessor, sample_scale
from dgq_core.kernels import IntConv2d, IntLinear, cpu_attention, vnni_fused
from dgq_core.kernels.int_mm import IntMmGemm
from dgq_core.kernels.onednn import OnednnGemm
from dgq_core.kernels.vnni_fused import VnniFusedGemm
from dgq_core.layers import (
    MAX_FAKE_DUPLICATION,
    ActQuantizer,
    QuantConv2d,
    QuantizedWeight,
    StepActParams,
    TapGroups,
    fake_quant_activation,
)
from dgq_core.quantizers import minmax_params, qmax
from dgq_core.steps import StepState

HAS_TRITON = importlib.util.find_spec("triton") is not None


def fused_backend():
    from dgq_core.kernels.triton_fused import FusedGroupGemm

    return FusedGroupGemm("cpu")


BACKENDS = {
    "onednn": OnednnGemm, "vnni": VnniFusedGemm, "int_mm": lambda: IntMmGemm("cpu"), "triton": fused_backend,
    # The VNNI kernel's path for CPUs without AVX-512 VBMI2 (Cascade Lake), which scatter the permuted codes.
    "vnni-no-vbmi2": lambda: VnniFusedGemm(vnni_fused.build(("-mno-avx512vbmi2",))),
}
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install -e '.[dev]'")
NEEDS_VNNI = pytest.mark.skipif(not vnni_fused.available(), reason="the CPU has no AVX-512 VNNI")
BACKEND_MARKS = {"triton": NEEDS_TRITON, "vnni": NEEDS_VNNI, "vnni-no-vbmi2": NEEDS_VNNI}
BACKEND_PARAMS = [pytest.param(name, marks=BACKEND_MARKS.get(name, ())) for name in BACKENDS]
NEEDS_AVX512 = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU has no AVX-512")


def triton_attention():
    from dgq_core.kernels.triton_attention import dgq_attention

    return dgq_attention


# The fused attention kernels by name; "cpu-recompute" is the CPU kernel with no room to keep the exponentials
# between its passes (`scores_budget_bytes=0`), so that it computes them twice.
ATTENTION_KERNELS = {
    "triton": triton_attention,
    "cpu": lambda: cpu_attention.dgq_attention,
    "cpu-recompute": lambda: functools.partial(cpu_attention.dgq_attention, scores_budget_bytes=0),
}
ATTENTION_MARKS = {"triton": NEEDS_TRITON, "cpu": NEEDS_AVX512, "cpu-recompute": NEEDS_AVX512}
ATTENTION_PARAMS = [pytest.param(name, marks=ATTENTION_MARKS[name]) for name in ATTENTION_KERNELS]
GROUPS = 8


def psnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (test - reference).double().pow(2).mean().item()
    peak = reference.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def act_params(
    x_axis_values: torch.Tensor, mode: str, bits: int, axis: str | None, dim: int
) -> StepActParams:
    """Parameters like calibration makes: random groups along `dim` of `x`, each covering its members' range."""
    if mode == "token":
        return StepActParams("token", bits)
    if mode == "tensor":
        lo, hi = x_axis_values.min().clamp_max(0), x_axis_values.max().clamp_min(0)
        scale, zero_point = minmax_params(lo, hi, bits)
        return StepActParams("tensor", bits, scale=scale.reshape(1), zero_point=zero_point.reshape(1))
    moved = x_axis_values.movedim(dim, 0).flatten(1)
    labels = torch.randint(0, GROUPS, (moved.shape[0],), generator=torch.Generator().manual_seed(1))
    scale, zero_point = minmax_params(*group_ranges(moved, labels, GROUPS), bits)
    return StepActParams("group", bits, axis, labels, scale, zero_point)


def group_ranges(moved: torch.Tensor, labels: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (min, max) over its members (rows of `moved`); [0, 1] for an empty group."""
    lo = torch.stack([moved[labels == g].min() if (labels == g).any() else torch.tensor(0.0) for g in range(groups)])
    hi = torch.stack([moved[labels == g].max() if (labels == g).any() else torch.tensor(1.0) for g in range(groups)])
    return lo, hi


def channel_outliers(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Scale a few indices along `dim` up, as DGQ's outlier channels/pixels look."""
    gain = torch.ones(x.shape[dim])
    gain[:: max(1, x.shape[dim] // 5)] = 8.0
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * gain.view(shape)


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding: the integer products are exact, only the order of float sums differs."""
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


CASES = [
    ("tensor", None),
    ("token", None),
    ("group", "channel"),
    ("group", "pixel"),
]


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (8, 6), (4, 8), (4, 6)])
@pytest.mark.parametrize("mode,axis", CASES)
def test_linear_matches_fake(backend_name, w_bits, a_bits, mode, axis):
    torch.manual_seed(0)
    linear = torch.nn.Linear(72, 40)
    weight = QuantizedWeight.from_float(linear.weight, w_bits)
    x = torch.randn(2, 24, 72)
    dim = -1 if axis == "channel" else -2
    x = channel_outliers(x, dim)
    params = act_params(x, mode, a_bits, axis, dim % 3)
    ref = F.linear(fake_quant_activation(x, params, "linear"), weight.dequantize(), linear.bias.detach())

    backend = BACKENDS[backend_name]()
    executor = IntLinear.from_quantized(
        weight.codes, weight.scale, weight.zero_point, w_bits, linear.bias.detach(), backend, 72
    )
    check(executor(x, params), ref)


def fake_conv(
    conv: torch.nn.Conv2d, weight: QuantizedWeight, x: torch.Tensor, params: StepActParams
) -> torch.Tensor:
    """DGQ's conv semantics: per-tensor quantizes the input, groups and tokens quantize its im2col unfolding."""
    w = weight.dequantize()
    bias = conv.bias.detach()
    if params.mode == "tensor":
        return F.conv2d(
            fake_quant_activation(x, params, "linear"), w, bias, conv.stride, conv.padding, conv.dilation
        )
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    out = w.reshape(w.shape[0], -1) @ fake_quant_activation(columns, params, "conv") + bias[:, None]
    h = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[
        0
    ] + 1
    return out.reshape(x.shape[0], -1, h, out.shape[-1] // h)


CONVS = {
    "3x3": dict(kernel_size=3, padding=1),
    "1x1": dict(kernel_size=1),
    "3x3-stride2": dict(kernel_size=3, padding=1, stride=2),
    "3x3-dilation2": dict(kernel_size=3, padding=2, dilation=2),
    "3x3-wide": dict(kernel_size=3, padding=1),  # its image is 4 x 21 (the others' 10 x 10): rows of 16+ pixels
    "3x3-valid": dict(kernel_size=3),  # output narrower than its input
}
IMAGE_SIZE = {"3x3-wide": (4, 21)}


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (8, 6), (4, 8)])
@pytest.mark.parametrize("mode,axis", CASES)
@pytest.mark.parametrize("shape", CONVS)
def test_conv_matches_fake(backend_name, w_bits, a_bits, mode, axis, shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, **CONVS[shape])
    weight = QuantizedWeight.from_float(conv.weight, w_bits)
    x = channel_outliers(torch.randn(2, 16, *IMAGE_SIZE.get(shape, (10, 10))), 1)
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    params = act_params(columns if mode == "group" else x, mode, a_bits, axis, 1 if axis == "channel" else 2)
    ref = fake_conv(conv, weight, x, params)

    backend = BACKENDS[backend_name]()
    executor = IntConv2d.from_quantized(
        weight.codes,
        weight.scale,
        weight.zero_point,
        w_bits,
        conv.bias.detach(),
        backend,
        in_channels=16,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        act_mode=mode,
    )
    check(executor(x, params), ref)


@pytest.mark.parametrize("positions", [64, 1024])
def test_channel_grouped_conv_runs_natively_only_at_large_sizes(positions):
    # Labels tied across the taps (one per input channel), as DGQ finds away from the padding.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    weight = QuantizedWeight.from_float(conv.weight, 8)
    x = channel_outliers(torch.randn(2, 16, 10, 10), 1)
    columns = F.unfold(x, 3, padding=1)
    labels = torch.randint(0, GROUPS, (16,), generator=torch.Generator().manual_seed(1)).repeat_interleave(9)
    params = act_params_for_labels(columns, labels, 8)
    executor = IntConv2d.from_quantized(
        weight.codes, weight.scale, weight.zero_point, 8, conv.bias.detach(), OnednnGemm(), 16, (3, 3),
        padding=(1, 1), channel_labels=[params.labels], row_params=False, calibrated_positions=positions,
    )  # fmt: skip
    assert bool(executor.native_plans) == (positions >= 256)
    assert (executor.linear is None) == (positions >= 256)
    check(executor(x, params), fake_conv(conv, weight, x, params))


def act_params_for_labels(columns: torch.Tensor, labels: torch.Tensor, bits: int) -> StepActParams:
    """Group parameters covering each group's range along the unfolding's channel axis, for given labels."""
    lo, hi = group_ranges(columns.movedim(1, 0).flatten(1), labels, int(labels.max()) + 1)
    scale, zero_point = minmax_params(lo.clamp_max(0), hi.clamp_min(0), bits)
    return StepActParams("group", bits, "channel", labels, scale, zero_point)


def test_channel_group_slices_are_cached_per_labelling():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    weight = QuantizedWeight.from_float(linear.weight, 8)
    executor = IntLinear.from_quantized(weight.codes, weight.scale, weight.zero_point, 8, None, OnednnGemm())
    x = torch.randn(4, 32)
    before = executor.resident_nbytes()
    first = act_params(x, "group", 6, "channel", 1)
    executor(x, first)
    after_one = executor.resident_nbytes()
    executor(x, first)
    assert executor.resident_nbytes() == after_one > before
    relabelled = StepActParams("group", 6, "channel", first.labels.roll(1), first.scale, first.zero_point)
    executor(x, relabelled)
    assert executor.resident_nbytes() > after_one


@pytest.mark.parametrize("w_bits", [8, 4])
def test_layer_with_shared_channel_groups_keeps_one_weight_copy(w_bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(640, 96)
    weight = QuantizedWeight.from_float(linear.weight, w_bits)
    x = channel_outliers(torch.randn(2, 10, 640), -1)
    channel = act_params(x, "group", 8, "channel", 2)
    pixel = act_params(x, "group", 8, "pixel", 1)

    def executor(row_params: bool) -> IntLinear:
        return IntLinear.from_quantized(
            weight.codes, weight.scale, weight.zero_point, w_bits, linear.bias.detach(), OnednnGemm(), 640,
            channel_labels=[channel.labels], row_params=row_params,
        )  # fmt: skip

    slices_only, slices_and_whole = executor(False), executor(True)
    if w_bits == 8:
        assert slices_only.resident_nbytes() < slices_and_whole.resident_nbytes()
    else:  # W4 keeps its nibbles and nothing else either way
        assert slices_only.resident_nbytes() == slices_and_whole.resident_nbytes() < 96 * 640
    for params in (channel, pixel):  # a pixel-group step runs over the channel-group slices
        ref = F.linear(fake_quant_activation(x, params, "linear"), weight.dequantize(), linear.bias.detach())
        check(slices_only(x, params), ref)
    assert torch.equal(slices_only.weight_codes(), weight.unpacked_codes())


SATURATION_SCRIPT = """
import json, torch, torch.nn.functional as F
from dgq_core.kernels import IntLinear
from dgq_core.kernels.onednn import OnednnGemm, has_vnni
from dgq_core.layers import QuantizedWeight, StepActParams, fake_quant_activation
from dgq_core.quantizers import minmax_params
torch.manual_seed(0)
linear = torch.nn.Linear(256, 64)
weight = QuantizedWeight.from_float(linear.weight, 8)
x = torch.randn(64, 256)
scale, zero_point = minmax_params(x.min(), x.max(), 8)
params = StepActParams("tensor", 8, scale=scale.reshape(1), zero_point=zero_point.reshape(1))
ref = F.linear(fake_quant_activation(x, params, "linear"), weight.dequantize())
errors = {}
for exact in (True, False):
    layer = IntLinear.from_quantized(weight.codes, weight.scale, weight.zero_point, 8, None, OnednnGemm(exact))
    errors[exact] = ((layer(x, params) - ref).abs().max() / ref.abs().max()).item()
print(json.dumps({"vnni": has_vnni(), "exact": errors[True], "single": errors[False]}))
"""


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_one_gemm_is_exact_with_vnni_and_the_split_keeps_avx2_exact(isa):
    # Uniform (random-init) weights and centred activations: adjacent u8*s8 products overflow int16 on AVX2, which
    # oneDNN is held to here by ONEDNN_MAX_CPU_ISA (read at its first use, so in a fresh process).
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa} if isa != "native" else dict(os.environ)
    result = subprocess.run([sys.executable, "-c", SATURATION_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors["exact"] < 1e-5
    if errors["vnni"]:
        assert errors["single"] < 1e-5, "int32 accumulation: one GEMM is exact"
    else:
        assert errors["single"] > 1e-3, "the single saturating GEMM is what the split avoids"


def test_w4_stays_packed_and_w8_one_byte_per_weight():
    torch.manual_seed(0)
    # Per-channel scales, zero points and column offsets cost ~16 bytes per output channel: small against 1280 inputs.
    linear = torch.nn.Linear(1280, 640)
    fp32_bytes = linear.weight.numel() * 4
    for bits, bound in ((8, 0.26), (4, 0.14)):
        weight = QuantizedWeight.from_float(linear.weight, bits)
        executor = IntLinear.from_quantized(
            weight.codes, weight.scale, weight.zero_point, bits, None, OnednnGemm(), 1280
        )
        assert executor.resident_nbytes() <= bound * fp32_bytes


def test_unquantized_activations_run_weight_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 8)
    weight = QuantizedWeight.from_float(linear.weight, 4)
    executor = IntLinear.from_quantized(
        weight.codes, weight.scale, weight.zero_point, 4, None, OnednnGemm(), 24
    )
    x = torch.randn(3, 24)
    torch.testing.assert_close(executor(x, StepActParams("none", 8)), F.linear(x, weight.dequantize()))


@NEEDS_TRITON
@pytest.mark.parametrize("w_bits", [8, 4])
def test_fused_kernel_keeps_one_unpadded_weight_for_every_labelling(w_bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 48)
    weight = QuantizedWeight.from_float(linear.weight, w_bits)
    x = channel_outliers(torch.randn(3, 7, 200), -1)
    first = act_params(x, "group", 8, "channel", 2)
    executor = IntLinear.from_quantized(
        weight.codes, weight.scale, weight.zero_point, w_bits, linear.bias.detach(), fused_backend(), 200,
        channel_labels=[first.labels], row_params=False,
    )  # fmt: skip
    # One byte per weight (W8) or the layer's own nibbles (W4), no padding; each labelling adds a few index vectors.
    weight_bytes = 48 * 200 * w_bits // 8
    labelling = 200 * 4 + (2 * GROUPS + 1) * 4  # input order, group bounds and parameter indices
    vectors = 5 * 48 * 4 + labelling
    assert executor.resident_nbytes() == weight_bytes + vectors
    relabelled = StepActParams("group", 8, "channel", first.labels.roll(3), first.scale, first.zero_point)
    for params in (first, relabelled):
        ref = F.linear(fake_quant_activation(x, params, "linear"), weight.dequantize(), linear.bias.detach())
        check(executor(x, params), ref)
    assert executor.resident_nbytes() == weight_bytes + vectors + labelling
    assert torch.equal(executor.weight_codes(), weight.unpacked_codes())


@NEEDS_VNNI
def test_vnni_kernel_keeps_one_packed_copy_per_labelling():
    """The VNNI kernel packs each labelling's weight in its column order: one byte per weight, each group padded to
    a multiple of 4 columns and the outputs to a multiple of 32, and no whole-matrix copy without per-tensor steps."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 48)
    weight = QuantizedWeight.from_float(linear.weight, 8)
    x = channel_outliers(torch.randn(3, 7, 200), -1)  # 21 rows: not a multiple of the kernel's 6-row tiles
    first = act_params(x, "group", 8, "channel", 2)
    executor = IntLinear.from_quantized(
        weight.codes, weight.scale, weight.zero_point, 8, linear.bias.detach(), VnniFusedGemm(), 200,
        channel_labels=[first.labels], row_params=False,
    )  # fmt: skip

    def labelling_bytes(labels: torch.Tensor) -> int:
        sizes = torch.bincount(labels, minlength=GROUPS)
        columns = int(sum(-(-int(size) // 4) * 4 for size in sizes if size > 0))
        groups = int((sizes > 0).sum())
        # panels, position of each input (int32), group of each input (uint8), quad bounds and group ids (int32)
        return 64 * columns + 200 * 5 + (2 * groups + 1) * 4

    vectors = 5 * 48 * 4
    assert executor.resident_nbytes() == labelling_bytes(first.labels) + vectors
    relabelled = StepActParams("group", 8, "channel", first.labels.roll(3), first.scale, first.zero_point)
    for params in (first, relabelled):
        ref = F.linear(fake_quant_activation(x, params, "linear"), weight.dequantize(), linear.bias.detach())
        check(executor(x, params), ref)
    expected = labelling_bytes(first.labels) + labelling_bytes(relabelled.labels) + vectors
    assert executor.resident_nbytes() == expected
    assert torch.equal(executor.weight_codes(), weight.unpacked_codes())


def reference_attention(bits: int, quantizer: str, keep_start: bool) -> DGQAttnProcessor:
    """The reference processor of DGQ's attention (its `_attend` does not call its Q/K/V quantizers)."""

    def passthrough() -> ActQuantizer:
        return ActQuantizer("qkv", "none", bits, None)

    return DGQAttnProcessor(
        "dgq", bits, keep_start, passthrough(), passthrough(), passthrough(), StepState([1], (8, 8)),
        prob_quantizer=quantizer,
    )  # fmt: skip


def attention_inputs(batch, heads, queries, keys, head_dim, keep_start) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose probabilities look like SD's: the queries share a direction that the <start> key
    (when kept) points along, so that it takes about half of each row, as in cross-attention; sample 0 attends
    flatly and sample 1 sharply, so that their scales differ; key 3 points against the shared direction, so that
    its probabilities fall below the smallest code."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(head_dim, generator=generator)
    shared /= shared.norm()
    spread = torch.tensor([0.3] + [0.8] * (batch - 1)).view(batch, 1, 1, 1)
    query = torch.randn(batch, heads, queries, head_dim, generator=generator) * spread + 3 * shared
    key = torch.randn(batch, heads, keys, head_dim, generator=generator) * 0.6
    key[:, :, 3] = -60 * shared
    if keep_start:
        key[:, :, 0] = 6 * shared
    return query, key


def probability_codes(probs: torch.Tensor, keep_start: bool, quantizer: str, bits: int) -> torch.Tensor:
    """The code of every probability relative to its sample's scale, as a real number (integers for quantized
    probabilities; code boundaries at half-integers)."""
    quantized = probs[..., 1:] if keep_start else probs
    ratio = quantized.double() / sample_scale(probs, keep_start).double()
    if quantizer == "uniform":
        return ratio * qmax(bits)
    return -LOG_CODE_STEPS_PER_OCTAVE[quantizer] * torch.log2(ratio.clamp_min(2.0**-300))


@pytest.mark.parametrize("kernel", ATTENTION_PARAMS)
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("quantizer", ["log2", "log-sqrt2", "uniform"])
@pytest.mark.parametrize("keep_start", [True, False], ids=["cross", "self"])
def test_fused_attention_gives_the_reference_probability_codes(kernel, bits, quantizer, keep_start):
    """Each fused attention kernel quantizes every probability to the reference's code: with the values an identity
    matrix, its output is the quantized probabilities themselves. Two query blocks and three key tiles (Triton), 13
    query tiles with a partial one and 5 key vectors with a partial one (CPU); a code may differ only at a tie,
    where the reference's probability lies within float32 rounding of a code boundary (the kernels sum the softmax
    in another order and multiply by reciprocals)."""
    dgq_attention = ATTENTION_KERNELS[kernel]()
    keys = 77
    query, key = attention_inputs(2, 3, 100, keys, keys, keep_start)
    identity = torch.eye(keys).expand(2, 3, keys, keys)
    processor = reference_attention(bits, quantizer, keep_start)
    reference = processor._attend(query, key, identity, 0.3, None)
    fused = dgq_attention(query, key, identity, 0.3, bits, quantizer, keep_start)
    assert fused.shape == reference.shape
    if keep_start:
        torch.testing.assert_close(fused[..., 0], reference[..., 0], rtol=1e-5, atol=1e-6)
    fused_codes = probability_codes(fused, keep_start, quantizer, bits)
    reference_codes = probability_codes(reference, keep_start, quantizer, bits)
    assert torch.equal(fused_codes.round(), fused_codes.round(decimals=4)), "kernel values are codes"
    unquantized = probability_codes(processor._probs(query, key, 0.3, None), keep_start, quantizer, bits)
    differ = fused_codes.round() != reference_codes.round()
    at_tie = (unquantized - unquantized.floor() - 0.5).abs() < 1e-4
    assert bool((at_tie | ~differ).all()), "codes differ away from a code boundary"
    assert int(differ.sum()) <= 1e-4 * differ.numel()
    assert reference_codes.round().unique().numel() > 10, "the inputs exercise many codes"
    # Equal codes, equal values: each sample's scale is the reference's (to rounding).
    quantized = (slice(None),) * 3 + (slice(1, None) if keep_start else slice(None),)
    same = ~differ
    torch.testing.assert_close(fused[quantized][same], reference[quantized][same], rtol=1e-5, atol=0)


@pytest.mark.parametrize("kernel", ATTENTION_PARAMS)
@pytest.mark.parametrize("head_dim", [40, 80, 160])
@pytest.mark.parametrize("keep_start", [True, False], ids=["cross", "self"])
def test_fused_attention_matches_the_reference_processor(kernel, head_dim, keep_start):
    """Each kernel's output against the reference processor's at each tiling class (SD's head dims), over several
    query blocks and key tiles, each sample with its own scale."""
    dgq_attention = ATTENTION_KERNELS[kernel]()
    queries, keys = (70, 77) if keep_start else (70, 90)
    query, key = attention_inputs(2, 2, queries, keys, head_dim, keep_start)
    value = torch.randn(2, 2, keys, head_dim, generator=torch.Generator().manual_seed(1))
    for quantizer in ("log2", "log-sqrt2", "uniform"):
        reference = reference_attention(8, quantizer, keep_start)._attend(query, key, value, head_dim**-0.5, None)
        fused = dgq_attention(query, key, value, head_dim**-0.5, 8, quantizer, keep_start)
        # A code that flips at a tie moves its row's output: at most one row in a hundred, the rest to rounding.
        row_error = (fused - reference).abs().amax(dim=-1) / reference.abs().max()
        assert float((row_error > 1e-5).float().mean()) <= 0.01
        alone = dgq_attention(query[1:], key[1:], value[1:], head_dim**-0.5, 8, quantizer, keep_start)
        assert torch.equal(alone, fused[1:]), "a sample's attention does not depend on its batch"


@NEEDS_AVX512
@pytest.mark.parametrize("keep_start", [True, False], ids=["cross", "self"])
def test_cpu_attention_gives_the_same_floats_whether_it_keeps_the_exponentials_or_not(keep_start):
    """The CPU kernel keeps as many (sample, head) planes of exponentials between its passes as the budget holds and
    computes the others again: any budget gives the same floats, so a sample's image does not depend on its batch
    (whose size moves that split). Also the queries as diffusers hands them, a strided view of (B, T, heads, d)."""
    query, key = attention_inputs(2, 3, 45, 77, 40, keep_start)
    query = query.transpose(1, 2).contiguous().transpose(1, 2)
    value = torch.randn(2, 3, 77, 40, generator=torch.Generator().manual_seed(1))
    plane_bytes = 4 * 45 * (80 + 16)
    results = [
        cpu_attention.dgq_attention(query, key, value, 0.2, 8, "log2", keep_start, scores_budget_bytes=budget)
        for budget in (0, 2 * plane_bytes + 7, 6 * plane_bytes, 1 << 30)
    ]
    assert all(torch.equal(result, results[0]) for result in results[1:])
    reference = reference_attention(8, "log2", keep_start)._attend(query, key, value, 0.2, None)
    torch.testing.assert_close(results[0], reference, rtol=1e-4, atol=1e-5)


@NEEDS_AVX512
def test_cpu_attention_takes_any_head_dim_and_dtype():
    """A head dim past the register tiles' 48 lanes and not a multiple of 16, and bfloat16 inputs (computed in
    float32, returned in the values' dtype): what a model's attention may hand the kernel, without an error."""
    query, key = attention_inputs(2, 2, 30, 40, 300, False)
    value = torch.randn(2, 2, 40, 300, generator=torch.Generator().manual_seed(1))
    reference = reference_attention(8, "log2", False)._attend(query, key, value, 300**-0.5, None)
    fused = cpu_attention.dgq_attention(query, key, value, 300**-0.5, 8, "log2", False)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    halves = [t.bfloat16() for t in (query, key, value)]
    in_bfloat16 = cpu_attention.dgq_attention(*halves, 300**-0.5, 8, "log2", False)
    expected = cpu_attention.dgq_attention(*(t.float() for t in halves), 300**-0.5, 8, "log2", False)
    assert in_bfloat16.dtype == torch.bfloat16 and torch.equal(in_bfloat16, expected.bfloat16())


COMPILE_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dgq_core.kernels import triton_attention as attention
from dgq_core.kernels import triton_fused as fused

target = GPUTarget("cuda", int(sys.argv[1]), 32)


def compile_ptx(kernel, types, constants, **options):
    signature = {name: "constexpr" if name in constants else types(name) for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=target, options=options)
    assert compiled.asm["cubin"], "ptxas made no cubin"
    return compiled.asm["ptx"]


pointers = {"x_ptr": "*fp32", "order_ptr": "*i32", "w_ptr": "*i8", "bounds_ptr": "*i32", "group_id_ptr": "*i32",
            "row_label_ptr": "*i32"}
scalars = {"stride_sample": "i64", "stride_position": "i64", "stride_k": "i64", "positions": "i32", "M": "i32",
           "N": "i32", "groups": "i32", "qmax": "fp32", "nibble_row_bytes": "i32", "label_period": "i32"}
flags = ("QUANTIZE", "GATHER", "ROW_GROUPS", "NIBBLES", "HAS_GAP", "HAS_BIAS", "HAS_ACC")
# The launches IntLinear makes: channel groups (quantize, gather) W8 and W4, pixel groups, one group, per-token codes.
launches = [(True, True, False, False, True, True, False), (True, True, False, True, True, True, False),
            (True, False, True, False, True, True, False), (True, False, False, False, True, False, False),
            (False, False, False, True, False, True, True)]
gemm = []
for values in launches:
    constants = dict(zip(flags, values)) | {"BM": 64, "BN": 64, "BK": 32}
    types = dict(pointers, **scalars)
    if not constants["QUANTIZE"]:
        types["x_ptr"] = "*u8"
    if constants["NIBBLES"]:
        types["w_ptr"] = "*u8"
    gemm.append(compile_ptx(fused._kernel, lambda name: types.get(name, "*fp32"), constants))

sizes = {"heads", "n_queries", "n_keys", "head_dim", "quantizer", "keep_start"}


def attention_types(name):
    if name.endswith("_ptr"):
        return "*fp32"
    return "i64" if name.startswith("stride") else "i32" if name in sizes else "fp32"


# Every launch dgq_attention makes: the tiles of each head-dim class (SD's 40, 80 and 160, SDXL's 64 share the first);
# the quantizer and the <start> switch are run-time arguments.
attention_ptx = []
for head_dim in (40, 80, 160):
    for kernel, tiles in zip((attention._row_statistics, attention._quantized_attention),
                             attention.launch_tiles(head_dim)):
        constants = {"PRECISION": attention.DOT_PRECISION, "BM": tiles.queries, "BN": tiles.keys, "BD": tiles.dims}
        attention_ptx.append(compile_ptx(kernel, attention_types, constants, num_warps=tiles.warps,
                                         num_stages=tiles.stages))
print(json.dumps({"gemm": gemm, "attention": attention_ptx}))
"""


@NEEDS_TRITON
@pytest.mark.parametrize(
    "capability,int8_mma,tf32_mma",
    [(90, "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8", ".f32.tf32.tf32"),
     (80, ".s32.s8.s8.s32", "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")],
)  # fmt: skip
def test_fused_kernels_compile_to_tensor_core_code(capability, int8_mma, tf32_mma):
    """Triton compiles without a GPU (its frontend, LLVM and the bundled ptxas): the kernels the interpreter checks
    also build for Hopper (H100/H200) and Ampere, every launch variant of them: the GEMM with int8 tensor-core
    products, the attention with TF32 ones (three per dot, `triton_attention.DOT_PRECISION`)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(capability)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ptx = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(ptx["gemm"]) == 5 and len(ptx["attention"]) == 3 * 2
    for gemm in ptx["gemm"]:
        assert int8_mma in gemm
    for attention in ptx["attention"]:
        assert tf32_mma in attention


def fake_quant_conv(conv: torch.nn.Conv2d, params: StepActParams, w_bits: int = 8) -> QuantConv2d:
    """A `QuantConv2d` of `conv` whose input quantizer holds one step's group parameters `params`."""
    act = ActQuantizer("conv", "group", params.bits, None)
    act.axis = torch.zeros(1, dtype=torch.uint8)
    act.labels_channel = params.labels.to(torch.uint8)[None]
    act.scale, act.zero_point = params.scale[None], params.zero_point[None]
    return QuantConv2d.from_float(conv, w_bits, act)


@pytest.mark.parametrize("shape", CONVS)
@pytest.mark.parametrize("straddling", [0, 3, 40], ids=["tied", "few-straddle", "many-straddle"])
def test_fake_channel_grouped_conv_runs_natively_with_the_unfoldings_numbers(shape, straddling):
    """The fake path's native convolution (each channel read once per group it has taps in, the zero-padded input
    quantized elementwise) gives the im2col definition's output: padding quantized with each group's parameters
    (some zero points outside the code range, so a zero pads to a nonzero value), taps straddling groups."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, **CONVS[shape])
    x = channel_outliers(torch.randn(2, 16, 10, 10), 1)
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, GROUPS, (16,), generator=generator).repeat_interleave(taps)
    moved = torch.randperm(labels.numel(), generator=generator)[:straddling]
    labels[moved] = torch.randint(0, GROUPS, (len(moved),), generator=generator)
    lo, hi = group_ranges(columns.movedim(1, 0).flatten(1), labels, GROUPS)
    lo[::2] = lo[::2].clamp_min(1.0)  # ranges that leave out 0: those groups quantize the padding to a nonzero value
    scale, zero_point = minmax_params(lo, hi, 8)
    params = StepActParams("group", 8, "channel", labels, scale, zero_point)
    layer = fake_quant_conv(conv, params)

    duplication = TapGroups.of(labels, 16).duplication
    native = layer._reads_of(layer.act.params(torch.Size((2, 0, columns.shape[-1]))))
    assert (native is not None) == (duplication <= MAX_FAKE_DUPLICATION)
    with torch.no_grad():
        check(layer(x), fake_conv(conv, layer.weight_q, x, params))
