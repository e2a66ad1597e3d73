"""CUDA integer kernel with DGQ's channel-group loop fused in (Triton): one launch per layer call.

One program computes an (BM, BN) output tile: for each activation group it quantizes the group's input columns with
the group's (scale, zero point), multiplies the codes by the weight in int8 tensor-core dots with int32 accumulation,
and adds the group's float contribution to an accumulator held in registers; the weight zero point's rank-1 term,
the per-channel scale and the bias are applied once at the end. Compared with one GEMM per group (`kernels.int_mm`),
nothing is written to memory between groups, and the codes never exist in memory.

The weight stays resident once, transposed to (K, N) in its own input order, with no padding: a channel labelling is
only an index vector (which input each position reads) and group bounds, so per-step labellings cost K int32 each,
not a copy of the weight (BENCHMARKS.md, "UNet integer execution", item 8). A tile that straddles two groups is
loaded masked, once per group. W4 weights are read as the layer stores them (two codes per byte) and widened in
registers. Pixel groups run in the same launch: each row loads its group's parameters.

The int8 dot multiplies signed by signed, so codes enter as `q - 128` and each group's offset comes back out through
the weight's column sums over the group: `sum_k (q - z) W = sum_k (q - 128) W + (128 - z) sum_k W`.

On CPU tensors the same source runs in Triton's interpreter (`TRITON_INTERPRET`), which is how the tests check its
semantics without a GPU. **Not yet measured on a GPU** (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quantizers import unpack_int4
from .protocol import PackedWeight, uint8_codes

# 2^23: adding it to a float32 in [0, 2^23) rounds to an integer, ties to even (torch.round's rule), and subtracting
# it back is exact.
_ROUNDING_MAGIC = tl.constexpr(8388608.0)
# Tile sizes: int8 tensor-core dots need 32 along K; 64x64 outputs keep the int32 and float accumulators of a
# 4-warp program in registers. Not tuned: no GPU has been lent to measure on.
_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32


def _grouped_int8_linear(
    x_ptr, stride_sample, stride_position, stride_k, positions,
    order_ptr, w_ptr, nibble_row_bytes, bounds_ptr, group_id_ptr, row_label_ptr, label_period,
    scale_ptr, zero_point_ptr, w_scale_ptr, gap_ptr, bias_ptr, acc_ptr, out_ptr,
    M, N, groups, qmax,
    QUANTIZE: tl.constexpr, GATHER: tl.constexpr, ROW_GROUPS: tl.constexpr, NIBBLES: tl.constexpr,
    HAS_GAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out[m, n] = s_w[n] sum_g s_g sum_{k in g} (q[m, k] - z_g) W[k, n] - r[m] gap[n] + bias[n] (+ acc[m, n]).

    Column group g holds positions `bounds[g]:bounds[g + 1]` and takes the step's parameters `group_ids[g]`.
    Row m of the input is sample m // positions, position m % positions, so (M, K) rows and im2col unfoldings
    (B, K, L) are both read in place. Without QUANTIZE the input holds uint8 codes already (one group). With
    ROW_GROUPS (DGQ's pixel groups; one column group) row m takes the parameters of group
    `row_labels[m % label_period]`. W is the centred int8 (K, N) weight, or with NIBBLES the layer's 4-bit codes as
    stored, (N, K/2) bytes, low nibble first.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < N
    wide_rows = rows.to(tl.int64)
    row_offset = (wide_rows // positions) * stride_sample + (wide_rows % positions) * stride_position
    out = tl.zeros((BM, BN), dtype=tl.float32)
    dq_row_sums = tl.zeros((BM,), dtype=tl.float32)
    for group in range(groups):
        start = tl.load(bounds_ptr + group)
        end = tl.load(bounds_ptr + group + 1)
        # The (scale, zero point) of every row: its pixel group's, or the column group's.
        if ROW_GROUPS:
            param_index = tl.load(row_label_ptr + wide_rows % label_period, mask=row_ok, other=0)
        else:
            param_index = tl.zeros((BM,), dtype=tl.int32) + tl.load(group_id_ptr + group)
        scale = tl.load(scale_ptr + param_index)
        zero_point = tl.load(zero_point_ptr + param_index)
        # Correctly rounded, as torch.reciprocal (the reference quantizer's 1/s).
        inv_scale = tl.math.div_rn(1.0, scale)
        products = tl.zeros((BM, BN), dtype=tl.int32)
        weight_sums = tl.zeros((BN,), dtype=tl.int32)
        code_sums = tl.zeros((BM,), dtype=tl.int32)
        for k0 in range(start, end, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < end
            if GATHER:
                inputs = tl.load(order_ptr + ks, mask=k_ok, other=0).to(tl.int64)
            else:
                inputs = ks.to(tl.int64)
            x_mask = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + row_offset[:, None] + inputs[None, :] * stride_k, mask=x_mask, other=0)
            if QUANTIZE:
                # One rounding of x * (1/s) + z, as dgq_core.quantizers.quantize_uniform computes it.
                v = tl.fma(x.to(tl.float32), inv_scale[:, None], zero_point[:, None])
                v = tl.minimum(tl.maximum(v, 0.0), qmax)
                codes = ((v + _ROUNDING_MAGIC) - _ROUNDING_MAGIC).to(tl.int32)
            else:
                codes = x.to(tl.int32)
            codes = tl.where(x_mask, codes, 0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            if NIBBLES:
                byte_offsets = cols[None, :].to(tl.int64) * nibble_row_bytes + (inputs // 2)[:, None]
                nibble_pairs = tl.load(w_ptr + byte_offsets, mask=w_mask, other=0).to(tl.int32)
                w = ((nibble_pairs >> ((inputs % 2) * 4).to(tl.int32)[:, None]) & 15) - 8
                w = tl.where(w_mask, w, 0).to(tl.int8)
            else:
                w = tl.load(w_ptr + inputs[:, None] * N + cols[None, :], mask=w_mask, other=0)
            products = tl.dot((codes - 128).to(tl.int8), w, products, out_dtype=tl.int32)
            weight_sums += tl.sum(w.to(tl.int32), axis=0)
            code_sums += tl.sum(codes, axis=1)
        exact = products.to(tl.float32) + (128.0 - zero_point)[:, None] * weight_sums.to(tl.float32)[None, :]
        out += scale[:, None] * exact
        dq_row_sums += scale * (code_sums.to(tl.float32) - (end - start).to(tl.float32) * zero_point)
    out = out * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_GAP:
        out -= dq_row_sums[:, None] * tl.load(gap_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    offsets = wide_rows[:, None] * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_ACC:
        out += tl.load(acc_ptr + offsets, mask=out_mask, other=0.0)
    tl.store(out_ptr + offsets, out, mask=out_mask)


# Triton's interpreter replaces its language module when the process starts with TRITON_INTERPRET=1, so one process
# runs the kernel either compiled (CUDA tensors) or interpreted (CPU tensors), never both.
_kernel = triton.jit(_grouped_int8_linear)


def _interpreted() -> bool:
    """Whether this process runs Triton kernels in its interpreter (read at triton's import)."""
    knobs = getattr(triton, "knobs", None)  # Triton 3.4 and later
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_triton_device(device: torch.device) -> None:
    """Raise unless this process can run Triton kernels on `device`: compiled on CUDA, or in Triton's interpreter
    on CPU tensors (the tests)."""
    interpreted = _interpreted()
    if device.type == "cpu" and not interpreted:
        raise RuntimeError("Triton kernels run on CPU tensors in Triton's interpreter: set TRITON_INTERPRET=1")
    if device.type != "cpu" and interpreted:
        raise RuntimeError(f"Triton kernels compile for {device.type} only without TRITON_INTERPRET")


@dataclass
class KernelWeight:
    """A weight as the fused kernel reads it.

    Args:
        tensor (`torch.Tensor`): centred int8 (K, N), or the layer's own packed 4-bit codes (N, ceil(K/2)).
        nibbles (`bool`): which of the two.
    """

    tensor: torch.Tensor
    nibbles: bool = False


@dataclass
class GroupIndex:
    """A channel labelling as the fused kernel reads it.

    Args:
        order (`torch.Tensor | None`): (K,) int32 input index at each position, group after group; None: the inputs
            in their own order.
        bounds (`torch.Tensor`): (G + 1,) int32; group i holds positions `bounds[i]:bounds[i + 1]`.
        group_ids (`torch.Tensor`): (G,) int32 index of group i's parameters among the step's.
    """

    order: torch.Tensor | None
    bounds: torch.Tensor
    group_ids: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in (self.order, self.bounds, self.group_ids) if t is not None)


class FusedGroupGemm:
    """`GemmBackend` on the fused Triton kernel, plus `grouped_linear`, which runs every channel group in one launch.

    Args:
        device (`torch.device | str`): "cuda" compiles the kernel; "cpu" runs it in Triton's interpreter (tests).
    """

    name = "triton"
    native_conv = False
    fused_groups = True
    labelled_weights = False
    reads_nibbles = True
    reads_image_taps = False
    writes_images = False

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        check_triton_device(self.device)
        # The one-group labelling of each K (all inputs in order): made once, not copied to the device every call.
        self._one_groups: dict[int, GroupIndex] = {}

    quantize = staticmethod(uint8_codes)

    def pack(self, centred: torch.Tensor) -> PackedWeight:
        n, k = centred.shape
        weight = centred.to(self.device).t().contiguous()
        return PackedWeight(KernelWeight(weight), n, k, nbytes=weight.numel())

    def pack_nibbles(self, nibbles: torch.Tensor, in_features: int) -> PackedWeight:
        """The kernel's view of 4-bit codes packed two per byte (`quantizers.pack_int4`), read as they are stored.

        Args:
            nibbles (`torch.Tensor`): (N, ceil(K/2)) uint8 codes (offset 8), on this backend's device; not copied.
            in_features (`int`): K.

        Returns:
            `PackedWeight` whose `nbytes` is 0: the bytes are the caller's (a layer's code buffer).
        """
        return PackedWeight(KernelWeight(nibbles.contiguous(), nibbles=True), nibbles.shape[0], in_features, 0)

    def unpack(self, packed: PackedWeight) -> torch.Tensor:
        weight = packed.handle
        if weight.nibbles:
            return (unpack_int4(weight.tensor, packed.in_features).to(torch.int16) - 8).to(torch.int8)
        return weight.tensor.t().contiguous()

    def index_groups(
        self, order: torch.Tensor | None, bounds: list[int], group_ids: list[int], centred: torch.Tensor | None = None
    ) -> GroupIndex:
        """The kernel's form of a labelling: input order (None: their own), group bounds, each group's parameters
        (the weight is read whole, so `centred` is not needed)."""
        return GroupIndex(
            None if order is None else order.to(self.device, torch.int32),
            torch.tensor(bounds, dtype=torch.int32, device=self.device),
            torch.tensor(group_ids, dtype=torch.int32, device=self.device),
        )

    def grouped_linear(
        self,
        inputs: torch.Tensor,
        groups: GroupIndex | None,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        packed: PackedWeight,
        w_scale: torch.Tensor,
        zero_point_gap: torch.Tensor,
        bias: torch.Tensor | None = None,
        row_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer output `dq(x) W^T + b` (weight zero point included) of float inputs, quantized in the kernel.

        Args:
            inputs (`torch.Tensor`): float32 (M, K) rows, or an im2col unfolding (B, K, L) (rows are (b, l) pairs).
            groups (`GroupIndex | None`): the channel labelling; None: all K inputs in order, as one group.
            scale, zero_point (`torch.Tensor`): the step's parameters, indexed by `groups.group_ids` or `row_labels`
                ((1,) for one group).
            bits (`int`): activation code width.
            packed (`PackedWeight`): what `pack` or `pack_nibbles` returned.
            w_scale (`torch.Tensor`): (N,) per-output-channel scale. zero_point_gap (`torch.Tensor`): (N,)
                `s_w (z_w - o)`, the weight zero point's rank-1 factor.
            bias (`torch.Tensor | None`): (N,).
            row_labels (`torch.Tensor | None`): (P,) the group of each pixel (DGQ's pixel groups, with `groups`
                None): row m takes the parameters of group `row_labels[m % P]`.

        Returns:
            `torch.Tensor`: float32 (M, N).
        """
        return self._launch(
            inputs, packed, w_scale, groups=groups, row_labels=row_labels, scale=scale.float().contiguous(),
            zero_point=zero_point.float().contiguous(), qmax=(1 << bits) - 1, gap=zero_point_gap, bias=bias,
            quantize=True,
        )  # fmt: skip

    def linear(
        self, codes, x_scale, x_zero_point, packed, w_scale, bias=None, accumulate=None
    ) -> torch.Tensor:
        scale = torch.tensor([x_scale], dtype=torch.float32, device=self.device)
        zero_point = torch.tensor([float(x_zero_point)], device=self.device)
        return self._launch(
            codes, packed, w_scale, groups=None, row_labels=None, scale=scale, zero_point=zero_point, qmax=255,
            gap=None, bias=bias, accumulate=accumulate, quantize=False,
        )  # fmt: skip

    def _one_group(self, k: int) -> GroupIndex:
        """All K inputs in their own order, as group 0."""
        if k not in self._one_groups:
            self._one_groups[k] = self.index_groups(None, [0, k], [0])
        return self._one_groups[k]

    def _launch(
        self, inputs, packed, w_scale, *, groups, row_labels, scale, zero_point, qmax, gap, bias, quantize,
        accumulate=None,
    ) -> torch.Tensor:  # fmt: skip
        if inputs.dim() == 3:  # (B, K, L): row m = (m // L, m % L)
            batch, _, positions = inputs.shape
            strides = (inputs.stride(0), inputs.stride(2), inputs.stride(1), positions)
            m = batch * positions
        else:
            m = inputs.shape[0]
            strides = (0, inputs.stride(0), inputs.stride(1), max(m, 1))
        n = packed.out_features
        out = torch.empty(m, n, dtype=torch.float32, device=inputs.device)
        if m == 0:
            return out
        groups = groups if groups is not None else self._one_group(packed.in_features)
        if row_labels is not None:
            row_labels = row_labels.to(self.device, torch.int32)
        weight: KernelWeight = packed.handle
        # Any tensor on the device for the pointers the kernel is told it lacks (it never reads them).
        unused = w_scale
        grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
        _kernel[grid](
            inputs, *strides, unused if groups.order is None else groups.order, weight.tensor,
            weight.tensor.shape[1] if weight.nibbles else 0, groups.bounds, groups.group_ids,
            unused if row_labels is None else row_labels, 1 if row_labels is None else row_labels.numel(),
            scale, zero_point, w_scale, unused if gap is None else gap, unused if bias is None else bias,
            out if accumulate is None else accumulate, out, m, n, groups.bounds.numel() - 1, float(qmax),
            QUANTIZE=quantize, GATHER=groups.order is not None, ROW_GROUPS=row_labels is not None,
            NIBBLES=weight.nibbles, HAS_GAP=gap is not None, HAS_BIAS=bias is not None,
            HAS_ACC=accumulate is not None, BM=_BLOCK_M, BN=_BLOCK_N, BK=_BLOCK_K,
        )  # fmt: skip
        return out
