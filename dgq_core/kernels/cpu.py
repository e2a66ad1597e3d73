"""CPU integer kernels: oneDNN int8 GEMM and int8 convolution, both with float32 output.

Measured on the project's AVX2 CPUs (no VNNI), SD-UNet shapes, batch 2: oneDNN's int8 linear is 1.4-1.9x faster
than the fp32 matmul (and 1.2-1.7x faster than FBGEMM's `quantized::linear`), its int8 3x3 convolution about 2x
faster than the fp32 convolution, while `torch._int_mm` is 30-50x slower. Both return float32, so channel groups can
be accumulated across groups in float32 instead of being requantized.

Why not FBGEMM: its packed weight pads the contraction dim to a multiple of 512, so the channel-group slices DGQ
needs (a few to a few hundred columns each) take 2-66 bytes per weight instead of one (BENCHMARKS.md, "resident
memory"); oneDNN's packed weights stay near one byte per weight for any K.

Caveat of these CPUs: without VNNI oneDNN multiplies with `vpmaddubsw`, which adds two adjacent u8*s8 products in a
saturating int16. Products are exact while `|x_a*w_a + x_b*w_b| <= 32767`; that always holds when the activation
codes fit 7 bits (A <= 7) or the weight codes fit 4 bits (W4), and can fail for W8A8 with large codes on both sides.
`saturation_free(w_bits, a_bits)` says which combinations are exact. For the others `OnednnGemm(exact=True)` (the
default) splits the activation codes as `q = min(q, 127) + (q - min(q, 127))` into two saturation-free GEMMs, and
`exact=False` runs one saturating GEMM; BENCHMARKS.md measures what each costs in speed and in agreement.
"""

from __future__ import annotations

import torch

from .gemm import PackedWeight

# Largest int16 sum of two u8*s8 products: the vpmaddubsw limit on CPUs without VNNI.
_INT16_MAX = 32767
# Largest activation code whose pair sums with any int8 weight fit int16 (2 * 127 * 128 <= 32767); the high part
# q - min(q, 127) is at most 128, which fits too (2 * 128 * 128 = -(-32768) only for negative products).
_MAX_SAFE_CODE = 127


def saturation_free(w_bits: int, a_bits: int) -> bool:
    """Whether the AVX2 (non-VNNI) int8 kernels are exact for these code widths (see the module docstring)."""
    weight_magnitude = 1 << (w_bits - 1) if w_bits == 8 else (1 << w_bits) - 1
    return 2 * ((1 << a_bits) - 1) * weight_magnitude <= _INT16_MAX


def _weight_int8(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Signed int8 form of uint8 codes and the offset subtracted: 8-bit codes move to [-128, 127] (c ^ 0x80 read as
    int8 is c - 128, with no wider temporary), 4-bit codes are already int8 values."""
    if bits == 8:
        return (codes ^ 0x80).view(torch.int8), 128
    return codes.view(torch.int8), 0


def _uint8_codes(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_weight_int8`."""
    codes = weight.contiguous().view(torch.uint8)
    return codes ^ 0x80 if bits == 8 else codes


class OnednnGemm:
    """`GemmBackend` on oneDNN's int8 linear (`onednn::qlinear_pointwise`, float32 output).

    oneDNN takes symmetric int8 weights, so the weight is stored as `codes - offset` and its zero point comes back
    out in float32 as a rank-1 term: `sum_k q (W - z_w) = sum_k q (W - o) - (z_w - o) sum_k q`. The activation codes
    enter with scale 1 and zero point 0, so any activation zero point, in range or not, is handled by the caller.

    Args:
        exact (`bool`): split 8-bit activation codes above 127 into a second GEMM when the weight is 8-bit, so no int16
            pair sum can saturate (twice the GEMM work); False runs the single, possibly saturating GEMM.
    """

    name = "onednn"

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        # oneDNN wants a weight zero point per output channel; they are all 0 (see above), one tensor per width.
        self._zero_points: dict[int, torch.Tensor] = {}

    def pack(
        self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor, bits: int
    ) -> PackedWeight:
        weight, offset = _weight_int8(codes.contiguous(), bits)
        n, k = codes.shape
        scale = w_scale.float().contiguous()
        handle = {
            "weight": torch.ops.onednn.qlinear_prepack(weight, None),
            "scale": scale,
            # s_w[n] * (z_w[n] - o): what one unit of an activation row's code sum removes from output n.
            "zero_point_weight": scale * (w_zero_point.float() - offset),
        }
        self._zero_points.setdefault(n, torch.zeros(n, dtype=torch.long))
        # int8 matrix + two float32 vectors per output channel.
        return PackedWeight(handle, bits, n, k, nbytes=n * k + n * 8)

    def _gemm(self, codes_u8: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        h = packed.handle
        return torch.ops.onednn.qlinear_pointwise(
            codes_u8, 1.0, 0, h["weight"], h["scale"], self._zero_points[packed.out_features], None,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    def matmul(
        self, codes: torch.Tensor, packed: PackedWeight, x_scale: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        codes_u8 = codes.to(torch.uint8).contiguous()
        if self.exact and packed.bits == 8 and bool(codes.max() > _MAX_SAFE_CODE):
            low = codes_u8.clamp(max=_MAX_SAFE_CODE)
            out = self._gemm(low, packed).add_(self._gemm(codes_u8 - low, packed))
        else:
            out = self._gemm(codes_u8, packed)
        out.addr_(codes.sum(dim=1), packed.handle["zero_point_weight"], alpha=-1)
        if isinstance(x_scale, torch.Tensor) or x_scale != 1.0:
            out.mul_(x_scale)
        return out

    def codes(self, packed: PackedWeight) -> torch.Tensor:
        # The packed weight reads back as its (K, N) transpose.
        return _uint8_codes(packed.handle["weight"].to_dense().t(), packed.bits)

    def pack_conv(self, codes, w_scale, w_zero_point, bits, stride, padding, dilation) -> OnednnConv:
        return OnednnConv(codes, w_scale, w_zero_point, bits, stride, padding, dilation, self.exact)


class OnednnConv:
    """oneDNN int8 convolution with float32 output, for per-tensor activation parameters.

    oneDNN takes symmetric int8 weights only, so the weight is stored as `codes - offset` and the weight zero point
    is removed afterwards with one box sum of the centred activation codes (a 1-channel convolution).

    Args:
        codes (`torch.Tensor`): (Cout, Cin, kh, kw) uint8 weight codes.
        w_scale (`torch.Tensor`): (Cout,) scale. w_zero_point (`torch.Tensor`): (Cout,) zero point.
        bits (`int`): weight code width.
        stride, padding, dilation (`tuple[int, int]`): convolution geometry.
        exact (`bool`): as for `OnednnGemm`: split activation codes above 127 into a second convolution.
    """

    def __init__(
        self, codes, w_scale, w_zero_point, bits, stride, padding, dilation, exact: bool = True
    ) -> None:
        self.exact = exact and bits == 8
        self.geometry = [list(stride), list(padding), list(dilation)]
        self.kernel_size = tuple(codes.shape[2:])
        weight, offset = _weight_int8(codes, bits)
        self.w_scale = w_scale.float()
        self.packed = torch.ops.onednn.qconv_prepack(weight, self.w_scale, 1.0, 0, *self.geometry, 1, None)
        # s_w[n] * (z_w[n] - offset): what one unit of the box sum removes from output channel n.
        self.zero_point_weight = (self.w_scale * (w_zero_point - offset)).view(1, -1, 1, 1)
        self.nbytes = codes.numel() + 8 * codes.shape[0]

    def __call__(
        self, codes: torch.Tensor, x_scale: float, x_zero_point: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`conv(s_x (q - z), dq(W)) + b` from uint8-range float codes `q` of shape (B, Cin, H, W)."""
        if self.exact and bool(codes.max() > _MAX_SAFE_CODE):
            # sum (q - z) W = sum (min(q, 127) - z) W + sum (q - min(q, 127)) W; each part is saturation-free.
            low = codes.clamp(max=_MAX_SAFE_CODE)
            out = self._conv(low, x_scale, x_zero_point, bias).add_(self._conv(codes - low, x_scale, 0, None))
        else:
            out = self._conv(codes, x_scale, x_zero_point, bias)
        # Zero padding of q - z is what oneDNN's padding with the zero point means.
        centred_sum = (codes.sum(dim=1, keepdim=True) - x_zero_point * codes.shape[1]).float()
        box = torch.ones(1, 1, *self.kernel_size)
        box_sum = torch.nn.functional.conv2d(centred_sum, box, None, *self.geometry)
        return out.sub_(box_sum * (x_scale * self.zero_point_weight))

    def _conv(
        self, codes: torch.Tensor, x_scale: float, x_zero_point: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        x_u8 = codes.to(torch.uint8).contiguous(memory_format=torch.channels_last)
        zeros = torch.zeros(self.w_scale.numel(), dtype=torch.long)
        return torch.ops.onednn.qconv2d_pointwise(
            x_u8,
            x_scale,
            x_zero_point,
            self.packed,
            self.w_scale,
            zeros,
            bias,
            *self.geometry,
            1,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
