"""The one primitive every integer backend supplies: an integer GEMM of activation codes against weight codes.

A backend turns a weight's codes into whatever its kernel wants resident (`pack`), and multiplies activation codes by
it with the weight's zero point removed and the scales applied in the kernel's epilogue (`matmul`). Everything DGQ
adds on top (zero points of activations, pixel groups as row scales, channel groups as a loop over column slices,
im2col for convolutions) is written once, in `executors.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class PackedWeight:
    """A weight in a backend's resident form.

    Args:
        handle: the backend's object (a prepacked kernel weight, or a tensor).
        bits (`int`): weight code width. out_features, in_features (`int`): the (N, K) shape.
        nbytes (`int`): bytes kept resident (codes, scales, zero points, kernel-side offsets).
    """

    handle: Any
    bits: int
    out_features: int
    in_features: int
    nbytes: int


class GemmBackend(Protocol):
    """Integer GEMM of unsigned activation codes by per-output-channel asymmetric weight codes."""

    name: str

    def pack(
        self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor, bits: int
    ) -> PackedWeight:
        """Make the resident form of a weight.

        Args:
            codes (`torch.Tensor`): (N, K) uint8 weight codes in [0, 2^bits - 1] (already unpacked).
            w_scale (`torch.Tensor`): (N,) float per-output-channel scale.
            w_zero_point (`torch.Tensor`): (N,) integer-valued float zero point.
            bits (`int`): weight code width (8 or 4).
        """
        ...

    def matmul(
        self, codes: torch.Tensor, packed: PackedWeight, x_scale: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        """`x_scale * s_w[n] * sum_k codes[m, k] * (W[n, k] - z_w[n])` as float32 (M, N).

        Args:
            codes (`torch.Tensor`): (M, K) float32 activation codes (exact integers in [0, 255]).
            packed: what `pack` returned for the (N, K) weight.
            x_scale (`float | torch.Tensor`): scalar multiplier of the whole product (a group's activation scale).
        """
        ...

    def codes(self, packed: PackedWeight) -> torch.Tensor:
        """The (N, K) uint8 weight codes back from the resident form (to build channel-group slices)."""
        ...

    def pack_conv(
        self,
        codes: torch.Tensor,
        w_scale: torch.Tensor,
        w_zero_point: torch.Tensor,
        bits: int,
        stride,
        padding,
        dilation,
    ) -> Any | None:
        """A native int8 convolution for per-tensor activation parameters, or None to use im2col + `matmul`.

        The returned callable maps `(codes (B, Cin, H, W), x_scale, x_zero_point, bias)` to the float32 output and has
        an `nbytes` attribute.
        """
        ...
