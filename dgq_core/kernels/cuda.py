"""CUDA integer kernel: int8 x int8 -> int32 tensor-core GEMM (`torch._int_mm`, cuBLASLt) with a float32 epilogue.

`torch._int_mm` multiplies signed int8 by signed int8, so activation codes enter as `q - 128` and 8-bit weight codes
as `W - 128`; the offsets come back out exactly:

    sum_k q (W - z_w) = sum_k (q - 128)(W - o) + 128 * sum_k (W - o) + (o - z_w) * sum_k q,   o = 128 (W8) or 0 (W4)

Accumulation is int32, so the products are exact for every W/A width (no int16 saturation as on AVX2 CPUs). The
same code runs on CPU tensors (slowly), which is how the tests check its semantics on machines without a GPU.
cuBLASLt's int8 GEMM wants M > 16 and K, N multiples of 8: operands are zero-padded to those sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gemm import PackedWeight


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class IntMmGemm:
    """`GemmBackend` on `torch._int_mm`.

    Args:
        device (`torch.device | str`): where packed weights live and GEMMs run.
    """

    name = "int_mm"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)

    def pack(
        self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor, bits: int
    ) -> PackedWeight:
        n, k = codes.shape
        offset = 128 if bits == 8 else 0
        weight = (codes.to(self.device, torch.int16) - offset).to(torch.int8)
        # Zero rows/columns of padding add nothing to any product.
        weight = F.pad(weight, (0, _round_up(k, 8) - k, 0, _round_up(n, 8) - n))
        handle = {
            "weight": weight,
            "offset_sum": 128.0 * weight[:n].sum(dim=1, dtype=torch.int32).float(),
            "zero_point_gap": offset - w_zero_point.to(self.device).float(),
            "scale": w_scale.to(self.device).float(),
        }
        # int8 matrix + four float32 vectors per output channel.
        return PackedWeight(handle, bits, n, k, nbytes=weight.numel() + 16 * n)

    def matmul(
        self, codes: torch.Tensor, packed: PackedWeight, x_scale: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        h = packed.handle
        m, k = codes.shape
        n = packed.out_features
        centred = (codes - 128).to(torch.int8)
        centred = F.pad(centred, (0, h["weight"].shape[1] - k, 0, max(17 - m, 0)))
        acc = torch._int_mm(centred, h["weight"].t())[:m, :n].float()
        acc.add_(h["offset_sum"]).addr_(codes.sum(dim=1), h["zero_point_gap"])
        return acc.mul_(h["scale"] * x_scale)

    def codes(self, packed: PackedWeight) -> torch.Tensor:
        offset = 128 if packed.bits == 8 else 0
        weight = packed.handle["weight"][: packed.out_features, : packed.in_features]
        return (weight.to(torch.int16) + offset).to(torch.uint8)

    def pack_conv(self, codes, w_scale, w_zero_point, bits, stride, padding, dilation) -> None:
        # No int8 convolution with a float32 epilogue is exposed on CUDA: convolutions go through im2col + GEMM.
        return None
