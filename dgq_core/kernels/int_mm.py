"""CUDA integer GEMM without Triton: int8 x int8 -> int32 tensor-core GEMM (`torch._int_mm`, cuBLASLt), one per
channel group, with a float32 epilogue. Where Triton is installed (the CUDA torch wheel brings it), the fused kernel
of `kernels.triton_fused` runs instead.

`torch._int_mm` multiplies signed int8 by signed int8, so activation codes enter as `q - 128` and the offset comes
back out exactly through the weight's row sums:

    sum_k (q - z) W = sum_k (q - 128) W + (128 - z) * sum_k W

Accumulation is int32, so the products are exact for every W/A width. The same code runs on CPU tensors (slowly),
which is how the tests check its semantics on machines without a GPU. cuBLASLt's int8 GEMM wants M > 16 and K, N
multiples of 8: operands are zero-padded to those sizes. There is no int8 convolution with a float32 epilogue to call,
so convolutions go through im2col + GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .protocol import PackedWeight, uint8_codes


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class IntMmGemm:
    """`GemmBackend` on `torch._int_mm`.

    Args:
        device (`torch.device | str`): where packed weights live and GEMMs run.
    """

    name = "int_mm"
    native_conv = False
    fused_groups = False
    labelled_weights = False
    reads_nibbles = False
    reads_image_taps = False
    writes_images = False

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)

    quantize = staticmethod(uint8_codes)

    def pack(self, centred: torch.Tensor) -> PackedWeight:
        n, k = centred.shape
        # Zero rows/columns of padding add nothing to any product.
        weight = F.pad(centred.to(self.device), (0, _round_up(k, 8) - k, 0, _round_up(n, 8) - n))
        handle = {"weight": weight, "row_sums": weight[:n].sum(dim=1, dtype=torch.int32).float()}
        return PackedWeight(handle, n, k, nbytes=weight.numel() + 4 * n)

    def unpack(self, packed: PackedWeight) -> torch.Tensor:
        return packed.handle["weight"][: packed.out_features, : packed.in_features].clone()

    def linear(
        self, codes, x_scale, x_zero_point, packed, w_scale, bias=None, accumulate=None
    ) -> torch.Tensor:
        h = packed.handle
        m, k = codes.shape
        centred = (codes.to(torch.int16) - 128).to(torch.int8)
        centred = F.pad(centred, (0, h["weight"].shape[1] - k, 0, max(17 - m, 0)))
        acc = torch._int_mm(centred, h["weight"].t())[:m, : packed.out_features].float()
        out = acc.add_(h["row_sums"], alpha=128 - x_zero_point).mul_(w_scale * x_scale)
        if bias is not None:
            out.add_(bias)
        return out if accumulate is None else accumulate.add_(out)

    def pack_conv(self, centred, stride, padding, dilation) -> PackedWeight:
        raise NotImplementedError("the CUDA backend runs convolutions through im2col + linear")

    conv = pack_conv
