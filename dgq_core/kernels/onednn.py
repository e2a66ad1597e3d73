"""CPU integer kernels: oneDNN's int8 linear and convolution with float32 output and the accumulation fused in.

Measured on the project's CPUs (BENCHMARKS.md, "UNet integer execution"): on Sapphire Rapids (AMX int8) oneDNN's int8
GEMM is 5-12x faster than the fp32 matmul at SD-UNet shapes; on AVX2 CPUs without VNNI 1.3-1.9x. `torch._int_mm` on
CPU is 30-50x slower than fp32 and FBGEMM pads its packed weights' contraction dim to a multiple of 512, which DGQ's
channel-group slices (a few to a few hundred columns each) cannot afford. Both ops take the activation zero point
(any integer) and return float32, and their "sum" post-op adds the result into an existing output in the same pass:
the per-group GEMMs of a channel-grouped layer accumulate without extra passes over the output.

Exactness: with VNNI (AVX512-VNNI, AVX-VNNI, AMX) oneDNN accumulates u8*s8 products in int32, so every width is exact.
Without it (AVX2) it multiplies with `vpmaddubsw`, which adds two adjacent u8*s8 products in a *saturating* int16:
exact while `|x_a*w_a + x_b*w_b| <= 32767`, which holds for weights within [-64, 64] (W4) or codes up to 127 (A <= 7).
For 8-bit weights and codes on such CPUs `OnednnGemm(exact=True)` (the default) splits the codes as
`q = min(q, 127) + (q - min(q, 127))` into two saturation-free GEMMs; `exact=False` runs the single saturating GEMM.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ..quantizers import qmax
from .protocol import PackedWeight, uint8_codes

# `torch.quantize_per_tensor` is the one-pass quantizer whose rounding (one fused multiply-add) the reference
# `quantize_uniform` reproduces; torch 2.13 marks it deprecated, and the Makefile pins that release.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")

# Largest code whose int16 pair sums with any int8 weight fit (2 * 127 * 128 <= 32767); the rest, q - 127, is at
# most 128, which fits too.
_MAX_SAFE_CODE = 127
# oneDNN's packed int8 weights already pad a linear layer's contraction dim to a multiple of 64 and a convolution's
# input channels beyond 64 to one; group slices are padded to those sizes (with zero weights) so that the thousands
# of slices of a UNet share a few dozen GEMM/convolution shapes, and with them oneDNN's JIT-compiled primitives
# (with one primitive per slice, a UNet call needs more than the default primitive cache of 1,024 holds, and compiles
# them anew on every call).
_LINEAR_K_MULTIPLE = 64


def _padded_channels(channels: int) -> int:
    multiple = 16 if channels <= 64 else 64
    return -(-channels // multiple) * multiple


# oneDNN ISA limits below VNNI (`ONEDNN_MAX_CPU_ISA`); the VNNI ones (AVX2_VNNI, AVX512_CORE_VNNI, AMX) are exact.
_ISAS_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
# Largest weight magnitude whose int16 pair sums with any 8-bit code fit: 2 * 255 * 64 = 32640 <= 32767.
_MAX_SAFE_WEIGHT = 64


def has_vnni() -> bool:
    """Whether oneDNN's int8 kernels accumulate in int32 here (no int16 saturation): the CPU has VNNI and oneDNN
    is not held below it by `ONEDNN_MAX_CPU_ISA`."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if limit.upper() in _ISAS_WITHOUT_VNNI:
        return False
    return bool(torch.cpu._is_vnni_supported())


class OnednnGemm:
    """`GemmBackend` on `onednn::qlinear_pointwise` and `onednn::qconv2d_pointwise`.

    Args:
        exact (`bool`): on CPUs without VNNI, split 8-bit codes above 127 into a second GEMM when the weight is wider
            than +-64, so no int16 pair sum can saturate (twice the GEMM work); False runs the single saturating
            GEMM. Ignored where VNNI makes one GEMM exact.
    """

    name = "onednn"
    native_conv = True
    fused_groups = False
    labelled_weights = False
    reads_nibbles = False
    reads_image_taps = False
    writes_images = False

    def __init__(self, exact: bool = True) -> None:
        self.split_wide = exact and not has_vnni()
        # oneDNN takes a weight zero point per output channel; they are all 0 (weights enter centred).
        self._zero_points: dict[int, torch.Tensor] = {}

    def _weight_zero_points(self, n: int) -> torch.Tensor:
        if n not in self._zero_points:
            self._zero_points[n] = torch.zeros(n, dtype=torch.long)
        return self._zero_points[n]

    def _needs_split(self, centred: torch.Tensor) -> bool:
        return self.split_wide and bool(centred.abs().max() > _MAX_SAFE_WEIGHT)

    def quantize(self, x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
        if not 0 <= zero_point <= 255:
            # quint8 takes zero points in [0, 255] only; a range that excludes 0 has one outside (rare).
            return uint8_codes(x, scale, zero_point, bits)
        quantized = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
        # The quint8 tensor's bytes are the codes: a uint8 view of its storage costs nothing, where `int_repr()`
        # copies them at 2.5x the cost of the quantization itself (2048x320: 136 us vs 43 us, 2 threads).
        codes = torch.empty(0, dtype=torch.uint8, device=x.device).set_(
            quantized.untyped_storage(), quantized.storage_offset(), quantized.size(), quantized.stride()
        )
        return codes.clamp_(max=qmax(bits)) if bits < 8 else codes

    def pack(self, centred: torch.Tensor) -> PackedWeight:
        n, k = centred.shape
        padded = -(-k // _LINEAR_K_MULTIPLE) * _LINEAR_K_MULTIPLE
        weight = torch.ops.onednn.qlinear_prepack(F.pad(centred, (0, padded - k)).contiguous(), None)
        handle = {"weight": weight, "split": self._needs_split(centred), "padded": padded}
        return PackedWeight(handle, n, k, nbytes=torch.ops.mkldnn._nbytes(weight))

    def unpack(self, packed: PackedWeight) -> torch.Tensor:
        weight = packed.handle["weight"].to_dense()
        if weight.dim() == 2:  # a linear weight reads back as its (K, N) transpose
            return weight.t()[:, : packed.in_features].contiguous()
        return weight[:, : packed.handle["channels"]].contiguous()

    def _split(self, codes: torch.Tensor, packed: PackedWeight) -> torch.Tensor | None:
        if packed.handle["split"] and bool(codes.max() > _MAX_SAFE_CODE):
            return codes.clamp(max=_MAX_SAFE_CODE)
        return None

    def linear(
        self, codes, x_scale, x_zero_point, packed, w_scale, bias=None, accumulate=None
    ) -> torch.Tensor:
        low = self._split(codes, packed)
        if low is not None:
            # sum (q - z) W = sum (min(q, 127) - z) W + sum (q - min(q, 127)) W; each part is saturation-free.
            out = self.linear(low, x_scale, x_zero_point, packed, w_scale, bias, accumulate)
            return self.linear(codes - low, x_scale, 0, packed, w_scale, None, out)
        zero_points = self._weight_zero_points(packed.out_features)
        weight = packed.handle["weight"]
        if codes.shape[1] < packed.handle["padded"]:
            codes = F.pad(codes, (0, packed.handle["padded"] - codes.shape[1]))
        if accumulate is None:
            return torch.ops.onednn.qlinear_pointwise(
                codes, x_scale, x_zero_point, weight, w_scale, zero_points, bias,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        return torch.ops.onednn.qlinear_pointwise.binary(
            codes, x_scale, x_zero_point, weight, w_scale, zero_points, accumulate, bias,
            1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip

    def pack_conv(self, centred: torch.Tensor, stride, padding, dilation) -> PackedWeight:
        cout, channels = centred.shape[:2]
        geometry = [list(stride), list(padding), list(dilation)]
        padded = F.pad(centred, (0, 0, 0, 0, 0, _padded_channels(channels) - channels)).contiguous()
        weight = torch.ops.onednn.qconv_prepack(padded, torch.ones(cout), 1.0, 0, *geometry, 1, None)
        handle = {"weight": weight, "split": self._needs_split(centred), "channels": channels}
        return PackedWeight(handle, cout, centred[0].numel(), nbytes=torch.ops.mkldnn._nbytes(weight))

    def conv(
        self, codes, x_scale, x_zero_point, packed, w_scale, geometry, bias=None, accumulate=None
    ) -> torch.Tensor:
        low = self._split(codes, packed)
        if low is not None:
            out = self.conv(low, x_scale, x_zero_point, packed, w_scale, geometry, bias, accumulate)
            return self.conv(codes - low, x_scale, 0, packed, w_scale, geometry, None, out)
        if codes.shape[1] < _padded_channels(codes.shape[1]):
            codes = F.pad(codes, (0, 0, 0, 0, 0, _padded_channels(codes.shape[1]) - codes.shape[1]))
        codes = codes.contiguous(memory_format=torch.channels_last)
        zero_points = self._weight_zero_points(packed.out_features)
        weight = packed.handle["weight"]
        stride, padding, dilation = (list(v) for v in geometry)
        if accumulate is None:
            return torch.ops.onednn.qconv2d_pointwise(
                codes, x_scale, x_zero_point, weight, w_scale, zero_points, bias, stride, padding, dilation, 1,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        return torch.ops.onednn.qconv2d_pointwise.binary(
            codes, x_scale, x_zero_point, weight, w_scale, zero_points, accumulate, bias,
            stride, padding, dilation, 1, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip
