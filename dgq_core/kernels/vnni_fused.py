"""CPU integer kernel with DGQ's channel-group loop fused in (AVX-512 VNNI, C in `vnni_fused.c`): one pass per
layer call, where oneDNN needs one GEMM per group.

oneDNN runs a channel-grouped Linear as one int8 GEMM per group (`kernels.onednn`): on SD v1.5's UNet that is 1,896
GEMMs for 184 layers, each group padded to 64 columns, plus a gather and a quantization per group (BENCHMARKS.md,
"CPU peers (issue 22)", the profile). Here a layer call is two passes:

1. `quantize_rows`: the float inputs are quantized with each column's group parameters (per column, or per row for
   DGQ's pixel groups) straight into a code matrix whose columns are in the labelling's order, group after group,
   each group padded to a multiple of 4 columns; each row's sum of dequantized values comes out of the same pass.
2. `grouped_gemm`: register tiles of 6 rows x 32 outputs accumulate `u8 x s8` products in int32 with `vpdpbusd`
   within a group, and in float32 across groups (`s_g * int32 sum`); the zero points, the weight's per-channel scale,
   its zero point's rank-1 term and the bias are applied once per output.

The weight of each channel labelling is packed in that labelling's column order (`PanelWeight`), so a layer keeps
one packed copy per distinct labelling, like oneDNN's slices, but without their padding to 64. Convolutions keep
oneDNN's native int8 convolution (this backend inherits it); their im2col path reads the unfolding in place.

The zero points: with codes `q` and weights `W` (centred), a group contributes
`s_g sum_k (q - z_g) W = s_g sum_k q W - s_g z_g sum_{k in g} W`; the second term, summed over groups, is a vector
`c[n]` per call (channel groups) or `s_m z_m sum_k W[n, k]` (pixel groups), subtracted in the epilogue. The weight's
per-group column sums are recomputed per call (`zero_point_terms`), not kept.

Built by `native.build` at first use where the CPU has AVX-512 VNNI; `available()` says whether it can run.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import native
from .onednn import OnednnGemm
from .protocol import ImageTaps, PackedWeight

SOURCE = Path(__file__).with_name("vnni_fused.c").read_text()
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
# The C kernel's register tile: rows per tile, output channels per panel and per tile.
TILE_ROWS, PANEL, TILE_COLS = 6, 16, 32
QUAD = 4

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _build() -> ctypes.CDLL | None:
    if "avx512_vnni" not in native.cpu_flags():
        return None
    loaded = native.build("vnni_fused", SOURCE, FLAGS, "channel groups run as one oneDNN GEMM each")
    if loaded is None:
        return None
    pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    loaded.quantize_rows.argtypes = (
        [pointer] + [i64] * 6 + [pointer] * 5 + [i64, f32, pointer, i64, pointer, i32]
    )
    loaded.grouped_gemm.argtypes = (
        [pointer, i64, i64, pointer, i64, i64, pointer, i64] + [pointer] * 3 + [f32] + [pointer] * 7 + [i32]
    )
    loaded.quantize_taps.argtypes = [pointer] + [i64] * 12 + [pointer] * 4 + [f32, pointer, i64] + [pointer] * 2 + [i32]
    loaded.quantize_taps.restype = None
    loaded.zero_point_terms.argtypes = [pointer, i64, i64, pointer, i64, pointer, pointer, i32]
    loaded.quantize_rows.restype = loaded.grouped_gemm.restype = loaded.zero_point_terms.restype = None
    return loaded


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built at the first call; None where the CPU lacks AVX-512 VNNI or it cannot be built."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library, _tried = _build(), True
    return _library


def available() -> bool:
    """Whether this machine runs the fused VNNI kernel."""
    return library() is not None


def _ceil(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass
class PanelWeight:
    """A centred int8 weight packed for the kernel in one channel labelling's column order.

    Args:
        panels (`torch.Tensor`): int8 (n_padded / 16, padded / 4, 16, 4): byte (p, q, c, j) is
            `W[16 p + c, column 4 q + j]` of the reordered, group-padded weight.
        padded (`int`): columns of a code row (each group padded to a multiple of 4).
        position_of (`torch.Tensor | None`): (K,) int32 code column of each input; None: inputs in their own order.
        column_group (`torch.Tensor | None`): (K,) uint8 group index (into `group_ids`) of each input; None: one group.
        quad_bounds (`torch.Tensor`): (G + 1,) int32; group i is code columns `4 quad_bounds[i]:4 quad_bounds[i+1]`.
        group_ids (`torch.Tensor`): (G,) int64 index of group i's parameters among the step's.
    """

    panels: torch.Tensor
    padded: int
    position_of: torch.Tensor | None
    column_group: torch.Tensor | None
    quad_bounds: torch.Tensor
    group_ids: torch.Tensor

    @property
    def n_padded(self) -> int:
        return self.panels.shape[0] * PANEL

    @property
    def nbytes(self) -> int:
        vectors = (self.position_of, self.column_group, self.quad_bounds, self.group_ids)
        return self.panels.numel() + sum(v.numel() * v.element_size() for v in vectors if v is not None)

    @classmethod
    def of(cls, centred: torch.Tensor, order: torch.Tensor | None, bounds: list[int], group_ids: list[int]):
        """Pack (N, K) `centred` with inputs `order[bounds[i]:bounds[i+1]]` as group i (order None: one group)."""
        n, k = centred.shape
        order = torch.arange(k) if order is None else order.long()
        sizes = [end - start for start, end in zip(bounds, bounds[1:], strict=False)]
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + _ceil(size, QUAD))
        padded = starts[-1]
        columns = torch.full((padded,), k, dtype=torch.long)  # column k of the widened weight is zeros
        positions = torch.cat([torch.arange(start, start + size) for start, size in zip(starts, sizes, strict=False)])
        columns[positions] = order
        n_padded = _ceil(n, TILE_COLS)
        wide = F.pad(centred, (0, 1, 0, n_padded - n)).index_select(1, columns)
        panels = wide.view(n_padded // PANEL, PANEL, padded // QUAD, QUAD).permute(0, 2, 1, 3).contiguous()
        one_group = len(sizes) == 1 and bool(torch.equal(order, torch.arange(k)))
        position_of = column_group = None
        if not one_group:
            position_of = torch.empty(k, dtype=torch.int32)
            position_of[order] = positions.to(torch.int32)
            column_group = torch.empty(k, dtype=torch.uint8)
            column_group[order] = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.uint8),
                                                          torch.tensor(sizes))
        quad_bounds = torch.tensor([start // QUAD for start in starts], dtype=torch.int32)
        return cls(panels, padded, position_of, column_group, quad_bounds, torch.tensor(group_ids).clamp_min(0))

    def unpack(self, out_features: int, in_features: int) -> torch.Tensor:
        """The (N, K) centred weight in input order."""
        wide = self.panels.permute(0, 2, 1, 3).reshape(self.n_padded, self.padded)[:out_features]
        if self.position_of is None:
            return wide[:, :in_features].contiguous()
        return wide.index_select(1, self.position_of.long())


class VnniFusedGemm(OnednnGemm):
    """`GemmBackend` whose linear layers run in the fused VNNI kernel (every channel group in one pass), with
    oneDNN's native int8 convolution and quantizer (inherited).

    Each channel labelling carries its own packed weight (`labelled_weights`); W4 layers run group by group
    (`reads_nibbles` False), widening their codes at each call as on oneDNN.
    """

    name = "vnni"
    fused_groups = True
    labelled_weights = True
    reads_nibbles = False
    reads_image_taps = True

    def __init__(self) -> None:
        super().__init__(exact=True)
        self.kernel = library()
        if self.kernel is None:
            raise RuntimeError("the fused VNNI kernel needs a CPU with AVX-512 VNNI and a C compiler")

    def pack(self, centred: torch.Tensor) -> PackedWeight:
        n, k = centred.shape
        weight = PanelWeight.of(centred, None, [0, k], [0])
        return PackedWeight(weight, n, k, nbytes=weight.nbytes)

    def unpack(self, packed: PackedWeight) -> torch.Tensor:
        if isinstance(packed.handle, PanelWeight):
            return packed.handle.unpack(packed.out_features, packed.in_features)
        return super().unpack(packed)  # a native convolution's weight

    def index_groups(self, order, bounds, group_ids, centred) -> PackedWeight:
        """The labelling's own packed weight: inputs `order`, group i at `order[bounds[i]:bounds[i+1]]`."""
        weight = PanelWeight.of(centred, order, bounds, group_ids)
        return PackedWeight(weight, centred.shape[0], centred.shape[1], nbytes=weight.nbytes)

    def grouped_linear(
        self, inputs, groups, scale, zero_point, bits, packed, w_scale, zero_point_gap, bias=None, row_labels=None
    ) -> torch.Tensor:
        """The layer output `dq(x) W^T + b` of float inputs; arguments as `triton_fused.FusedGroupGemm`'s, except
        that `groups` is `index_groups`' packed weight, which replaces `packed`."""
        packed = groups if groups is not None else packed
        weight: PanelWeight = packed.handle
        scale, zero_point = scale.float().reshape(-1), zero_point.float().reshape(-1)
        inverse = torch.reciprocal(scale)
        taps = isinstance(inputs, ImageTaps)
        if not taps and inputs.dim() == 2 and inputs.stride(1) != 1:
            inputs = inputs.contiguous()
        m = inputs.rows if taps else inputs.shape[0] if inputs.dim() == 2 else inputs.shape[0] * inputs.shape[2]
        if m == 0:
            return torch.empty(0, packed.out_features)
        # Padding columns and rows are left as they are: their weights are zero, and padding rows are not stored.
        codes = torch.empty(_ceil(m, TILE_ROWS), weight.padded, dtype=torch.uint8)
        row_sums = torch.empty(m)
        row_params, period, row_scale, group_scale, a = None, 1, None, None, None
        if row_labels is not None:  # pixel groups: one column group, parameters per row
            labels = row_labels.to(torch.int32).contiguous()
            tables = (inverse, zero_point, scale)
            row_params, period = labels, labels.numel()
            row_scale = F.pad(scale[labels.long()].repeat(m // period), (0, codes.shape[0] - m))
            a = (scale * zero_point)[labels.long()].repeat(m // period)
            coefficient = torch.ones(1)
        else:
            group_scale = scale[weight.group_ids].contiguous()
            coefficient = (scale * zero_point)[weight.group_ids]
            if weight.column_group is None and not taps and inputs.dim() == 2:  # one group of rows: scalars
                tables = (inverse[weight.group_ids], zero_point[weight.group_ids], group_scale)
                row_params = torch.zeros(1, dtype=torch.int32)
            else:
                column_group = weight.column_group
                if column_group is None:
                    column_group = torch.zeros(packed.in_features, dtype=torch.long)
                columns = weight.group_ids[column_group.long()]
                tables = (inverse[columns], zero_point[columns], scale[columns])
        threads, qmax = torch.get_num_threads(), float((1 << bits) - 1)
        position_of = weight.position_of
        if taps:
            if position_of is None:
                position_of = torch.arange(packed.in_features, dtype=torch.int32)
            image = inputs.image.contiguous()
            column_at = torch.empty(weight.padded, dtype=torch.int32)  # the kernel's scratch
            self.kernel.quantize_taps(
                image.data_ptr(), *image.shape, *inputs.kernel_size, *inputs.padding, *inputs.dilation,
                *inputs.output_size, position_of.data_ptr(), *(t.data_ptr() for t in tables), qmax,
                codes.data_ptr(), weight.padded, row_sums.data_ptr(), column_at.data_ptr(), threads,
            )  # fmt: skip
        else:
            if inputs.dim() == 3:  # (B, K, L) im2col unfolding: row m = (m // L, m % L)
                strides = (inputs.stride(0), inputs.stride(2), inputs.stride(1), inputs.shape[2])
            else:
                strides = (0, inputs.stride(0), 1, m)
            self.kernel.quantize_rows(
                inputs.data_ptr(), *strides, m, packed.in_features, _pointer(position_of),
                *(t.data_ptr() for t in tables), _pointer(row_params), period, qmax, codes.data_ptr(),
                weight.padded, row_sums.data_ptr(), threads,
            )  # fmt: skip
        c = self._zero_point_terms(weight, coefficient)
        return self._gemm(codes, m, packed, group_scale, row_scale, a, 1.0, c, w_scale, row_sums,
                          zero_point_gap, bias, None)

    def linear(self, codes, x_scale, x_zero_point, packed, w_scale, bias=None, accumulate=None) -> torch.Tensor:
        weight: PanelWeight = packed.handle
        m = codes.shape[0]
        rows = _ceil(m, TILE_ROWS)
        if rows != m or weight.padded != codes.shape[1] or not codes.is_contiguous():
            codes = F.pad(codes, (0, weight.padded - codes.shape[1], 0, rows - m)).contiguous()
        c = self._zero_point_terms(weight, torch.tensor([x_scale * x_zero_point], dtype=torch.float32))
        return self._gemm(codes, m, packed, torch.tensor([x_scale]), None, None, 1.0, c, w_scale, None, None,
                          bias, accumulate)

    def _zero_point_terms(self, weight: PanelWeight, coefficient: torch.Tensor) -> torch.Tensor:
        """(n_padded,) `sum_g coefficient[g] sum_{k in g} W[n, k]`: the weight's group sums are not kept but
        recomputed (a pass over the weight, 1/rows of the GEMM's work)."""
        c = torch.empty(weight.n_padded)
        self.kernel.zero_point_terms(
            weight.panels.data_ptr(), weight.padded, weight.n_padded, weight.quad_bounds.data_ptr(),
            weight.quad_bounds.numel() - 1, coefficient.float().contiguous().data_ptr(), c.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return c

    def _gemm(self, codes, m, packed, group_scale, row_scale, a, a_const, c, w_scale, row_sums, gap, bias, acc):
        weight: PanelWeight = packed.handle
        n = packed.out_features
        out = torch.empty(m, n)
        vectors = [None if v is None else v.float().contiguous() for v in (c, w_scale, row_sums, gap, bias)]
        accumulate = None if acc is None else acc.contiguous()
        self.kernel.grouped_gemm(
            codes.data_ptr(), m, weight.padded, weight.panels.data_ptr(), n, weight.n_padded,
            weight.quad_bounds.data_ptr(), weight.quad_bounds.numel() - 1, _pointer(group_scale),
            _pointer(row_scale), _pointer(None if a is None else a.contiguous()), a_const,
            *(_pointer(v) for v in vectors), _pointer(accumulate), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out
