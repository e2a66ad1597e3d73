"""CPU integer kernel with DGQ's channel-group loop fused in (AVX-512 VNNI, C in `vnni_fused.c`): one C call per
layer call, where oneDNN needs one GEMM per group.

oneDNN runs a channel-grouped Linear as one int8 GEMM per group (`kernels.onednn`): on SD v1.5's UNet that is 1,896
GEMMs for 184 layers, each group padded to 64 columns, plus a gather and a quantization per group (BENCHMARKS.md,
"CPU peers (issue 22)", the profile). Here a layer call (`dgq_linear`) is two passes:

1. The float inputs are quantized with each column's group parameters (per column, or per row for DGQ's pixel
   groups) straight into a code matrix whose columns are in the labelling's order, group after group, each group
   padded to a multiple of 4 columns; each row's sum of dequantized values comes out of the same pass. Rows are
   quantized in their own order and each group's codes packed by `vpcompressb` (AVX-512 VBMI2; scattered one by one
   without it). A convolution's unfolding is read 16 output pixels by 16 code columns at a time, a stride-1 one
   from its image (`ImageTaps`).
2. Register tiles of 6 rows x 32 outputs accumulate `u8 x s8` products in int32 with `vpdpbusd` within a group, and
   in float32 across groups (`s_g * int32 sum`); the zero points, the weight's per-channel scale, its zero point's
   rank-1 term and the bias are applied once per output.

The weight of each channel labelling is packed in that labelling's column order (`PanelWeight`), so a layer keeps
one packed copy per distinct labelling, like oneDNN's slices, but without their padding to 64. Per-tensor
convolutions keep oneDNN's native int8 convolution (this backend inherits it).

The zero points: with codes `q` and weights `W` (centred), a group contributes
`s_g sum_k (q - z_g) W = s_g sum_k q W - s_g z_g sum_{k in g} W`; the second term, summed over groups, is a vector
`c[n]` per call (channel groups) or `s_m z_m sum_k W[n, k]` (pixel groups), subtracted in the epilogue. The weight's
per-group column sums are not kept: each GEMM task sums its 32 channels' weights as it starts.

Built by `native.build` at first use where the CPU has AVX-512 VNNI; `available()` says whether it can run.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import native
from .onednn import OnednnGemm
from .protocol import ImageTaps, PackedWeight

SOURCE = Path(__file__).with_name("vnni_fused.c").read_text()
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-lm"]
# The C kernel's register tile: rows per tile, output channels per panel and per tile.
PANEL, TILE_COLS = 16, 32
QUAD = 4


def build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile (or load from the cache) the kernel for this CPU; None where it lacks AVX-512 VNNI or the build fails.

    Args:
        extra_flags (`tuple[str, ...]`): compiler flags after `-march=native`: `("-mno-avx512vbmi2",)` builds the code
            path of VNNI CPUs without VBMI2 (Cascade Lake), which the tests run beside this CPU's.
    """
    if "avx512_vnni" not in native.cpu_flags():
        return None
    flags = [*FLAGS[:2], *extra_flags, *FLAGS[2:]]
    loaded = native.build("vnni_fused", SOURCE, flags, "channel groups run as one oneDNN GEMM each")
    if loaded is None:
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    loaded.dgq_linear.argtypes = (
        [ctypes.c_int, pointer, pointer, pointer, pointer, i64, pointer, pointer, i64, pointer, i64, ctypes.c_float]
        + [pointer] * 3 + [i64] * 3 + [pointer] * 5 + [ctypes.c_int]
    )
    loaded.dgq_linear.restype = i64
    return loaded


_LIBRARY = native.BuiltOnce(build)


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built at the first call; None where the CPU lacks AVX-512 VNNI or it cannot be built."""
    return _LIBRARY.get()


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
        group_ids (`torch.Tensor`): (G,) int32 index of group i's parameters among the step's.
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
        if len(bounds) > 257:
            raise ValueError(f"the VNNI kernel takes at most 256 channel groups, not {len(bounds) - 1}")
        # Each group's inputs in ascending order: the kernel packs a group's codes as they come (`vpcompressb`).
        order = torch.arange(k) if order is None else order.long()
        order = torch.cat([order[start:end].sort().values for start, end in zip(bounds, bounds[1:], strict=False)])
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
        group_ids = torch.tensor(group_ids, dtype=torch.int32).clamp_min(0)
        return cls(panels, padded, position_of, column_group, quad_bounds, group_ids)

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

    Args:
        kernel (`ctypes.CDLL | None`): a `build` of the kernel; None: this CPU's (`library()`).
    """

    name = "vnni"
    fused_groups = True
    labelled_weights = True
    reads_nibbles = False
    reads_image_taps = True
    writes_images = True

    def __init__(self, kernel: ctypes.CDLL | None = None) -> None:
        super().__init__(exact=True)
        self.kernel = kernel if kernel is not None else library()
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
        that `groups` is `index_groups`' packed weight, which replaces `packed`, and that `inputs` may be
        `ImageTaps`. A convolution's unfolding (`ImageTaps`, or (B, K, L)) gives its images (B, N, L)
        (`writes_images`), rows (M, K) give rows (M, N)."""
        packed = groups if groups is not None else packed
        if isinstance(inputs, ImageTaps):
            image = inputs.image.contiguous()
            kind, x, out_shape = 1, image, (image.shape[0], packed.out_features, inputs.rows // image.shape[0])
            shape = (*image.shape, *inputs.kernel_size, *inputs.padding, *inputs.dilation, *inputs.output_size)
        elif inputs.dim() == 3:  # (B, K, L) im2col unfolding: row m = (m // L, m % L)
            x = inputs if inputs.stride(2) == 1 else inputs.contiguous()
            kind, out_shape = 3, (x.shape[0], packed.out_features, x.shape[2])
            shape = (x.stride(0), x.stride(1), x.shape[2], x.shape[0] * x.shape[2], x.shape[1])
        else:
            x = inputs if inputs.stride(1) == 1 else inputs.contiguous()
            kind, out_shape = 0, (x.shape[0], packed.out_features)
            shape = (x.stride(0), *x.shape)
        labels = None if row_labels is None else row_labels.to(torch.int64).contiguous()
        return self._run(kind, x, shape, out_shape, scale, zero_point, bits, packed, w_scale, zero_point_gap, bias,
                         None, labels)  # fmt: skip

    def linear(self, codes, x_scale, x_zero_point, packed, w_scale, bias=None, accumulate=None) -> torch.Tensor:
        codes = codes.contiguous()
        scale, zero_point = torch.tensor([x_scale]), torch.tensor([float(x_zero_point)])
        return self._run(2, codes, tuple(codes.shape), (codes.shape[0], packed.out_features), scale, zero_point, 8,
                         packed, w_scale, None, bias, accumulate, None)  # fmt: skip

    def _run(self, kind, x, shape, out_shape, scale, zero_point, bits, packed, w_scale, gap, bias, acc, labels):
        """One `dgq_linear` call of the C kernel (its comment documents the arguments) into a new `out_shape`."""
        weight: PanelWeight = packed.handle
        out = torch.empty(out_shape)
        if out.numel() == 0:
            return out
        scale, zero_point = scale.float().contiguous(), zero_point.float().contiguous()
        vectors = [None if v is None else v.float().contiguous() for v in (w_scale, gap, bias, acc)]
        failed = self.kernel.dgq_linear(
            kind, x.data_ptr(), (ctypes.c_int64 * len(shape))(*shape), scale.data_ptr(), zero_point.data_ptr(),
            scale.numel(), weight.group_ids.data_ptr(), _pointer(weight.column_group), weight.group_ids.numel(),
            _pointer(labels), 1 if labels is None else labels.numel(), float((1 << bits) - 1),
            weight.panels.data_ptr(), _pointer(weight.position_of), weight.quad_bounds.data_ptr(), weight.padded,
            packed.out_features, weight.n_padded, *(_pointer(v) for v in vectors), out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            # MemoryError, as the service's workers recognize a failed allocation (they split the batch).
            raise MemoryError(f"the VNNI kernel could not allocate {failed:,} bytes of codes and tables")
        return out
