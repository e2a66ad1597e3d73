"""Integer executors vs the fake-quant reference, per layer type and activation mode, W8/W4, A8/A6.

All three backends are checked on CPU: oneDNN (the CPU kernels), `torch._int_mm` (the CUDA fallback's code, run on
CPU tensors) and the fused Triton kernel (the CUDA backend, run in Triton's interpreter).
They must match fake quantization to float rounding for every width: `_int_mm`, the Triton kernel and oneDNN with
VNNI accumulate in int32, and oneDNN without VNNI splits the codes that could saturate its int16 pair sums (checked
under `ONEDNN_MAX_CPU_ISA=AVX2`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dgq_core.kernels import IntConv2d, IntLinear
from dgq_core.kernels.int_mm import IntMmGemm
from dgq_core.kernels.onednn import OnednnGemm
from dgq_core.layers import QuantizedWeight, StepActParams, fake_quant_activation
from dgq_core.quantizers import minmax_params

HAS_TRITON = importlib.util.find_spec("triton") is not None


def fused_backend():
    from dgq_core.kernels.triton_fused import FusedGroupGemm

    return FusedGroupGemm("cpu")


BACKENDS = {"onednn": OnednnGemm, "int_mm": lambda: IntMmGemm("cpu"), "triton": fused_backend}
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install -e '.[dev]'")
BACKEND_PARAMS = [
    pytest.param(name, marks=NEEDS_TRITON) if name == "triton" else name for name in BACKENDS
]
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
}


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (8, 6), (4, 8)])
@pytest.mark.parametrize("mode,axis", CASES)
@pytest.mark.parametrize("shape", CONVS)
def test_conv_matches_fake(backend_name, w_bits, a_bits, mode, axis, shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, **CONVS[shape])
    weight = QuantizedWeight.from_float(conv.weight, w_bits)
    x = channel_outliers(torch.randn(2, 16, 10, 10), 1)
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


COMPILE_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dgq_core.kernels import triton_fused as fused

pointers = {"x_ptr": "*fp32", "order_ptr": "*i32", "w_ptr": "*i8", "bounds_ptr": "*i32", "group_id_ptr": "*i32",
            "row_label_ptr": "*i32"}
scalars = {"stride_sample": "i64", "stride_position": "i64", "stride_k": "i64", "positions": "i32", "M": "i32",
           "N": "i32", "groups": "i32", "qmax": "fp32", "nibble_row_bytes": "i32", "label_period": "i32"}
flags = ("QUANTIZE", "GATHER", "ROW_GROUPS", "NIBBLES", "HAS_GAP", "HAS_BIAS", "HAS_ACC")
# The launches IntLinear makes: channel groups (quantize, gather) W8 and W4, pixel groups, one group, per-token codes.
launches = [(True, True, False, False, True, True, False), (True, True, False, True, True, True, False),
            (True, False, True, False, True, True, False), (True, False, False, False, True, False, False),
            (False, False, False, True, False, True, True)]
ptx = []
for values in launches:
    constants = dict(zip(flags, values)) | {"BM": 64, "BN": 64, "BK": 32}
    signature = {
        name: "constexpr" if name in constants else pointers.get(name) or scalars.get(name) or "*fp32"
        for name in fused._kernel.arg_names
    }
    if not constants["QUANTIZE"]:
        signature["x_ptr"] = "*u8"
    if constants["NIBBLES"]:
        signature["w_ptr"] = "*u8"
    kernel = triton.compile(ASTSource(fused._kernel, signature, constexprs=constants),
                            target=GPUTarget("cuda", int(sys.argv[1]), 32))
    assert kernel.asm["cubin"], "ptxas made no cubin"
    ptx.append(kernel.asm["ptx"])
print(json.dumps(ptx))
"""


@NEEDS_TRITON
@pytest.mark.parametrize("capability,int8_mma", [(90, "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"),
                                                 (80, ".s32.s8.s8.s32")])  # fmt: skip
def test_fused_kernel_compiles_to_int8_tensor_core_code(capability, int8_mma):
    """Triton compiles without a GPU (its frontend, LLVM and the bundled ptxas): the kernel the interpreter checks
    also builds for Hopper (H100/H200) and Ampere, with int8 tensor-core products."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(capability)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for ptx in json.loads(result.stdout.strip().splitlines()[-1]):
        assert int8_mma in ptx
