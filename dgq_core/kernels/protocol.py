"""The one protocol every integer backend follows: int8 GEMMs over uint8 codes, and two optional capabilities, each
declared by a flag: a native int8 convolution (`native_conv`) and the whole channel-group loop in one launch
(`fused_groups`).

Backends: `vnni_fused.VnniFusedGemm` (CPU with AVX-512 VNNI, fused linear layers on oneDNN's convolutions),
`onednn.OnednnGemm` (CPU), `triton_fused.FusedGroupGemm` (CUDA, fused), `int_mm.IntMmGemm` (CUDA without Triton);
`backends.select_backend` picks one per device.

A backend keeps a weight in its own resident form (`pack`) and multiplies uint8 activation codes by it with the
activation's scale and zero point applied exactly, the weight's per-output-channel scale and an optional bias in the
epilogue, and optionally adds the result into an existing float32 output in the same pass (`accumulate`), which is
how DGQ's channel groups are summed. Weights enter *centred*: signed int8 `W - o` for a fixed offset `o`; the weight
zero point's remainder and everything else DGQ adds on top (groups, im2col, 4-bit codes) is written once, in
`executors.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..quantizers import quantize_uniform


@dataclass
class PackedWeight:
    """A centred int8 weight in a backend's resident form.

    Args:
        handle: the backend's object (a prepacked kernel weight, or a tensor).
        out_features, in_features (`int`): the (N, K) shape of the linear weight (for a convolution, K = Cin*kh*kw).
        nbytes (`int`): bytes the backend keeps resident for it, kernel-side padding included.
    """

    handle: Any
    out_features: int
    in_features: int
    nbytes: int


@dataclass
class ImageTaps:
    """The im2col unfolding of a stride-1 convolution's input, not materialized: what `grouped_linear` reads in
    place of (B, K, L) inputs on a backend that `reads_image_taps`. Column `(c * kh + ky) * kw + kx` of row
    `(b * Ho + oy) * Wo + ox` is `image[b, c, oy - pad_h + ky * dil_h, ox - pad_w + kx * dil_w]`, 0 outside.

    Args:
        image (`torch.Tensor`): (B, C, H, W) float32, contiguous.
        kernel_size, padding, dilation (`tuple[int, int]`): the convolution's geometry.
        output_size (`tuple[int, int]`): (Ho, Wo).
    """

    image: torch.Tensor
    kernel_size: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    output_size: tuple[int, int]

    @property
    def rows(self) -> int:
        return self.image.shape[0] * self.output_size[0] * self.output_size[1]


def uint8_codes(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """`quantizers.quantize_uniform`'s codes of `x` under one (scale, zero point), as uint8: `GemmBackend.quantize`
    for backends without a quantizer of their own."""
    return quantize_uniform(x, torch.tensor(scale), torch.tensor(float(zero_point)), bits).to(torch.uint8)


class GemmBackend(Protocol):
    """Integer products of uint8 activation codes and centred int8 weights, with a float32 epilogue."""

    name: str
    # Whether `conv` runs a native int8 convolution (else convolutions go through im2col + `linear`).
    native_conv: bool
    # Whether `grouped_linear` runs every channel group of a layer in one launch from float inputs (else the executors
    # quantize each group and call `linear` once per group).
    fused_groups: bool
    # Whether `index_groups` makes the labelling's own resident weight from the centred weight it is given (the CPU's
    # VNNI kernel packs the groups' columns contiguously), so the whole matrix is kept only for per-tensor and
    # per-row steps; else a labelling is only indices into the whole weight (Triton).
    labelled_weights: bool
    # Whether `grouped_linear` reads W4 codes as stored (`pack_nibbles`); else W4 layers run group by group.
    reads_nibbles: bool
    # Whether `grouped_linear` reads a stride-1 convolution's unfolding from its image (`ImageTaps`), so that
    # channel-grouped convolutions need no im2col copy.
    reads_image_taps: bool
    # Whether `grouped_linear` returns a convolution's output as its images (B, N, L) when its inputs are an unfolding
    # (B, K, L) or `ImageTaps` (else as rows (B * L, N), which the executor lays out as images).
    writes_images: bool

    def quantize(self, x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
        """uint8 codes of `x` under one (scale, zero point), equal to `dgq_core.quantizers.quantize_uniform`'s."""
        ...

    def pack(self, centred: torch.Tensor) -> PackedWeight:
        """Make the resident form of a (N, K) int8 weight."""
        ...

    def unpack(self, packed: PackedWeight) -> torch.Tensor:
        """The (N, K) int8 weight back from its resident form (convolutions: (Cout, Cin, kh, kw))."""
        ...

    def linear(
        self,
        codes: torch.Tensor,
        x_scale: float,
        x_zero_point: int,
        packed: PackedWeight,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        accumulate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x_scale * w_scale[n] * sum_k (codes[m, k] - x_zero_point) * W[n, k] + bias[n]` as float32 (M, N).

        Args:
            codes (`torch.Tensor`): (M, K) uint8 activation codes.
            x_scale (`float`), x_zero_point (`int`): the codes' scale and zero point (any integer zero point).
            packed (`PackedWeight`): what `pack` returned.
            w_scale (`torch.Tensor`): (N,) float32 per-output-channel scale.
            bias (`torch.Tensor | None`): (N,) float32.
            accumulate (`torch.Tensor | None`): (M, N) float32 the result is added into; the sum is returned (it may be
                a new tensor).
        """
        ...

    def pack_conv(self, centred: torch.Tensor, stride, padding, dilation) -> PackedWeight:
        """A native int8 convolution's resident (Cout, Cin, kh, kw) weight (only where `native_conv`)."""
        ...

    def conv(
        self,
        codes: torch.Tensor,
        x_scale: float,
        x_zero_point: int,
        packed: PackedWeight,
        w_scale: torch.Tensor,
        geometry: tuple,
        bias: torch.Tensor | None = None,
        accumulate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`conv2d(x_scale * (codes - x_zero_point), W * w_scale) + bias`, zero-padded in real values, as float32.

        Args:
            codes (`torch.Tensor`): (B, Cin, H, W) uint8 codes.
            geometry (`tuple`): (stride, padding, dilation), each a pair.
            Others: as for `linear`; `accumulate` is (B, Cout, Ho, Wo).
        """
        ...

    def pack_nibbles(self, nibbles: torch.Tensor, in_features: int) -> PackedWeight:
        """The resident form of 4-bit codes packed two per byte, read as stored (only where `fused_groups`)."""
        ...

    def index_groups(
        self, order: torch.Tensor | None, bounds: list[int], group_ids: list[int], centred: torch.Tensor
    ) -> Any:
        """The kernel's form of a channel labelling: input order, group bounds, each group's parameter index, and
        where `labelled_weights` the (N, K) `centred` weight packed in that order (only where `fused_groups`)."""
        ...

    def grouped_linear(
        self,
        inputs: torch.Tensor,
        groups: Any,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        packed: PackedWeight,
        w_scale: torch.Tensor,
        zero_point_gap: torch.Tensor,
        bias: torch.Tensor | None = None,
        row_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer output of float inputs, quantized and multiplied group by group in one launch (only where
        `fused_groups`; `triton_fused.FusedGroupGemm.grouped_linear` documents the arguments)."""
        ...
