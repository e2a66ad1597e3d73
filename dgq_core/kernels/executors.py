"""Integer execution of DGQ's quantized Linear and Conv2d, on any `GemmBackend`.

Activation codes `q` have a scale `s` and zero point `z` (one pair per tensor, per group of columns, per group of
rows, or per row); weight codes `W` have a per-output-channel scale `s_w` and zero point `z_w`. Weights are held
*centred*, `W - o` with `o = 2^(bits-1)`, so that they are signed int8 for the kernels, and the rest of the zero point
comes back out as a rank-1 term:

    y[m, n] = sum_k dq(x)[m, k] s_w[n] (W[n, k] - z_w[n]) + b[n]
            = s_w[n] sum_k dq(x)[m, k] (W[n, k] - o)  -  c[n] r[m]  +  b[n]
    dq(x) = s (q - z),   c[n] = s_w[n] (z_w[n] - o),   r[m] = sum_k dq(x)[m, k]

The backend computes the first term for one (s, z) at a time with the scales, the bias and the accumulation over
groups in its epilogue; `r` comes from uint8 row sums of the codes. So:

- per-tensor: one GEMM;
- channel groups (DGQ's "channel" axis is the contraction dim): one GEMM per group over that group's columns, each
  with its group's (s, z), summed in the epilogue; the weight is sliced by group once per distinct labelling;
- pixel groups (rows): one GEMM per group over its rows, written into its rows of the output;
- per-token (the dynamic baseline): one GEMM with per-row scales applied after it.

Convolutions: DGQ defines conv groups on the im2col unfolding (input channel x kernel tap). Per-tensor parameters run
as the backend's native int8 convolution on the quantized image. A backend that fuses the group loop runs channel
groups through it (the VNNI kernel reads a stride-1 convolution's unfolding from the image, `ImageTaps`). On the
others, channel groups whose labels are the same at every kernel tap of most input channels (as they are away from
the padding) run natively too, on layers with at least `MIN_NATIVE_POSITIONS` output positions: group g runs as one convolution over the channels with a tap in g, the other
taps' weights zeroed (channels whose taps straddle groups are duplicated, up to `MAX_NATIVE_DUPLICATION` of the
weight), and gets `r` from one more output channel whose weights are the group mask (scale 1). Everything else --
pointwise convolutions, smaller layers, straddling labels, pixel groups, per-token parameters -- runs as im2col + the
linear path, with channel groups gathered and quantized in the unfolding's own layout.

Weights stay resident in the backend's form (W8), or as 4-bit codes packed two per byte (W4) that are widened and
packed at each call; no floating-point copy is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..layers import StepActParams, TapGroups, conv_output_size, labelling_key, quantize_activation
from ..quantizers import dequantize_uniform, unpack_int4
from .protocol import GemmBackend, ImageTaps, PackedWeight

# A channel-grouped convolution runs natively when the channels it duplicates add at most this fraction of its weight
# and it has at least this many output positions per sample at the calibrated size: below that, im2col + GEMM is the
# faster of the two (SD v1.5 3x3 convolutions, 8 groups, 2 threads: 320 channels at 32x32 native 5.5 ms vs im2col
# 40 ms; 640 at 16x16 6.3 vs 8.0; 1280 at 8x8 9.4 vs 5.1).
MAX_NATIVE_DUPLICATION = 0.125
MIN_NATIVE_POSITIONS = 256


@dataclass
class _GroupPlan:
    """A weight split by activation group along its inputs (a linear layer's columns, a convolution's channels).

    Args:
        groups (`list[int]`): each part's group id (an index into the step's scales); [-1] for one part, all inputs.
        order (`torch.Tensor | None`): the input indices the parts read, group after group (a convolution's channel
            whose taps straddle groups appears in each of them); None: one part, all inputs in their own order.
        bounds (`list[int]`): part i reads `order[bounds[i]:bounds[i + 1]]`.
        packed (`list[PackedWeight] | None`): each part's resident weight; None when packed per call (W4) or when
            the backend fuses the groups (`fused_groups`) and reads the weight through `kernel_index`.
        kernel_index: the fused backend's form of `order` and `bounds` (`index_groups`): indices into the whole
            weight, or with `labelled_weights` the weight packed in this order; None for other backends.
    """

    groups: list[int]
    order: torch.Tensor | None
    bounds: list[int]
    packed: list[PackedWeight] | None
    kernel_index: Any = None

    @classmethod
    def of(
        cls, groups: list[int], indices: list[torch.Tensor], packed: list[PackedWeight] | None
    ) -> _GroupPlan:
        bounds = [0]
        for index in indices:
            bounds.append(bounds[-1] + len(index))
        return cls(groups, torch.cat(indices), bounds, packed)

    def sizes(self) -> list[int]:
        return [end - start for start, end in zip(self.bounds, self.bounds[1:], strict=False)]

    def indices(self, part: int) -> torch.Tensor:
        return self.order[self.bounds[part] : self.bounds[part + 1]]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The inputs in plan order: one gather for all parts."""
        return x if self.order is None else x.index_select(dim, self.order)

    def part(self, gathered: torch.Tensor, part: int, dim: int) -> torch.Tensor:
        """Part `part` of `gather`'s result."""
        if self.order is None:
            return gathered
        return gathered.narrow(dim, self.bounds[part], self.bounds[part + 1] - self.bounds[part])

    @property
    def nbytes(self) -> int:
        index = 0 if self.kernel_index is None else self.kernel_index.nbytes
        return index + sum(packed.nbytes for packed in self.packed or [])


class IntLinear:
    """`y = linear(dq(q(x)), dq(W), b)` with integer GEMMs.

    Build with `from_quantized`; call with the input and the step's `StepActParams`.

    Resident weight: W8 keeps the backend's form of the whole matrix if any step uses per-tensor or per-row
    parameters, plus one set of group slices per distinct channel labelling; with no such step the slices are the
    only copy (per-row steps then run over the slices). A backend that fuses the group loop (`fused_groups`) keeps
    only the whole matrix and an index vector per labelling (Triton), or with `labelled_weights` one copy packed in
    each labelling's order and the whole matrix only for per-tensor and per-row steps (the CPU's VNNI kernel). W4
    keeps only the 4-bit codes packed two per byte, which a backend that `reads_nibbles` reads as they are and the
    others widen and pack at each call, group by group.

    Args:
        backend (`GemmBackend`): the integer GEMM.
        w_scale, w_zero_point (`torch.Tensor`): (N,) per-output-channel parameters.
        bits (`int`): weight code width. in_features (`int`): K.
        bias (`torch.Tensor | None`): (N,) float32.
        nibbles (`torch.Tensor | None`): (N, ceil(K/2)) packed 4-bit codes for W4; None for W8.
    """

    def __init__(self, backend, w_scale, w_zero_point, bits, in_features, bias, nibbles=None) -> None:
        self.backend: GemmBackend = backend
        self.fused = backend.fused_groups and (bits == 8 or backend.reads_nibbles)
        self.whole: PackedWeight | None = None
        self.nibbles = nibbles
        self.bits, self.in_features, self.out_features = bits, in_features, w_scale.numel()
        self.offset = 1 << (bits - 1)
        self.w_scale = w_scale.float().contiguous()
        self.w_zero_point = w_zero_point.float()
        self.zero_point_gap = self.w_scale * (self.w_zero_point - self.offset)
        self.bias = None if bias is None else bias.float().contiguous()
        self.row_sums: torch.Tensor | None = None
        self._plans: dict[bytes, _GroupPlan] = {}

    @classmethod
    def from_quantized(
        cls,
        weight_codes: torch.Tensor,
        w_scale: torch.Tensor,
        w_zero_point: torch.Tensor,
        w_bits: int,
        bias: torch.Tensor | None,
        backend: GemmBackend,
        in_features: int | None = None,
        channel_labels: list[torch.Tensor] = (),
        row_params: bool = True,
    ) -> IntLinear:
        """Take a resident quantized weight.

        Args:
            weight_codes (`torch.Tensor`): (N, K) uint8 codes, or (N, ceil(K/2)) packed 4-bit codes when `w_bits == 4`.
            w_scale (`torch.Tensor`): (N,) scale. w_zero_point (`torch.Tensor`): (N,) integer-valued zero point.
            w_bits (`int`): 8 or 4. bias (`torch.Tensor | None`): (N,).
            backend (`GemmBackend`): from `dgq_core.kernels.select_backend`.
            in_features (`int | None`): K; required for packed 4-bit codes with an odd K.
            channel_labels (`list[torch.Tensor]`): the channel labellings the layer's steps use, sliced now; others
                are sliced at their first call.
            row_params (`bool`): whether any step uses per-tensor or per-row parameters; False keeps no
                whole-matrix copy next to the channel-group slices.
        """
        if w_bits not in (4, 8):
            raise ValueError(f"integer execution supports 8- and 4-bit weights, not {w_bits}")
        k = in_features if in_features is not None else weight_codes.shape[1] * (2 if w_bits == 4 else 1)
        nibbles = weight_codes.contiguous() if w_bits == 4 else None
        layer = cls(backend, w_scale, w_zero_point, w_bits, k, bias, nibbles)
        centred = layer.centred_weight(weight_codes if w_bits == 8 else None)
        # Per-row parameters need sum_k (W - o) per output channel: the zero point of each row times it comes out.
        layer.row_sums = layer.w_scale * centred.sum(dim=1, dtype=torch.int32).float()
        for labels in channel_labels:
            layer._plan(labels, centred)
        whole_for_groups = layer.fused and not backend.labelled_weights
        if w_bits == 8 and (row_params or not layer._plans or whole_for_groups):
            layer.whole = backend.pack(centred)
        elif w_bits == 4 and layer.fused:
            layer.whole = backend.pack_nibbles(nibbles, k)
        return layer

    def centred_weight(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) int8 `W - o`, from the given uint8 codes or from whatever form is resident."""
        if codes is not None:
            return (codes.to(torch.int16) - self.offset).to(torch.int8)
        if self.nibbles is not None:
            return (unpack_int4(self.nibbles, self.in_features).to(torch.int16) - self.offset).to(torch.int8)
        if self.whole is not None:
            return self.backend.unpack(self.whole)
        plan = next(iter(self._plans.values()))
        if plan.packed is None:  # a labelled weight (`labelled_weights`) holds the whole matrix, reordered
            return self.backend.unpack(plan.kernel_index)
        centred = torch.empty(
            self.out_features, self.in_features, dtype=torch.int8, device=self.w_scale.device
        )
        for part, packed in enumerate(plan.packed):
            centred[:, plan.indices(part)] = self.backend.unpack(packed)
        return centred

    def weight_codes(self) -> torch.Tensor:
        """(N, K) uint8 codes (unpacked from the resident form)."""
        return (self.centred_weight().to(torch.int16) + self.offset).to(torch.uint8)

    def resident_nbytes(self) -> int:
        """Bytes this layer keeps: weight (whole and/or channel-group slices), scales, zero points, bias, sums."""
        if self.nibbles is not None:
            weight = self.nibbles.numel()
        else:
            weight = 0 if self.whole is None else self.whole.nbytes
        weight += sum(plan.nbytes for plan in self._plans.values())
        vectors = [self.w_scale, self.w_zero_point, self.zero_point_gap, self.row_sums, self.bias]
        return weight + sum(v.numel() * v.element_size() for v in vectors if v is not None)

    def dequantized_weight(self) -> torch.Tensor:
        """Float weight, only for inputs left unquantized (activation mode "none")."""
        return dequantize_uniform(self.weight_codes(), self.w_scale[:, None], self.w_zero_point[:, None])

    def _plan(self, labels: torch.Tensor, centred: torch.Tensor | None = None, key: bytes | None = None) -> _GroupPlan:
        # Labels may differ per sampler step; each distinct labelling gets its own weight slices (see BENCHMARKS.md).
        key = labelling_key(labels) if key is None else key
        if key not in self._plans:
            centred = self.centred_weight() if centred is None else centred
            groups = torch.unique(labels).tolist()
            columns = [torch.nonzero(labels == group).flatten() for group in groups]
            packed = None
            if self.bits == 8 and not self.fused:
                packed = [self.backend.pack(centred.index_select(1, c)) for c in columns]
            plan = _GroupPlan.of(groups, columns, packed)
            if self.fused:
                plan.kernel_index = self.backend.index_groups(plan.order, plan.bounds, plan.groups, centred)
            self._plans[key] = plan
        return self._plans[key]

    def _fused(self, inputs, kernel_index, scale, zero_point, bits, row_labels=None) -> torch.Tensor:
        """The layer output from float inputs in one launch of a `fused_groups` backend."""
        return self.backend.grouped_linear(
            inputs, kernel_index, scale, zero_point, bits, self.whole, self.w_scale, self.zero_point_gap, self.bias,
            row_labels,
        )  # fmt: skip

    def _packed_parts(self, plan: _GroupPlan | None) -> list[tuple[torch.Tensor | None, PackedWeight]]:
        """(columns, packed weight) pairs that cover all K columns: the plan's parts, or the whole weight."""
        if plan is None and self.whole is not None:
            return [(None, self.whole)]
        if self.nibbles is not None:
            centred = self.centred_weight()
            if plan is None:
                return [(None, self.backend.pack(centred))]
            columns = [plan.indices(part) for part in range(len(plan.groups))]
            return [(c, self.backend.pack(centred.index_select(1, c))) for c in columns]
        plan = plan if plan is not None else next(iter(self._plans.values()))
        return [(plan.indices(part), packed) for part, packed in enumerate(plan.packed)]

    def _gemm(self, codes, scale, zero_point, parts, bias=None, accumulate=None) -> torch.Tensor:
        """`scale * s_w[n] * sum_k (codes - zero_point)(W - o) + bias` over all K columns, one GEMM per part."""
        out = accumulate
        for columns, packed in parts:
            part_codes = codes if columns is None else codes.index_select(1, columns)
            out = self.backend.linear(part_codes, scale, zero_point, packed, self.w_scale, bias, out)
            bias = None
        return out

    def __call__(self, x: torch.Tensor, params: StepActParams) -> torch.Tensor:
        """The layer output for input `x` of shape (..., K) under one step's activation parameters."""
        if params.mode == "none":
            return F.linear(x, self.dequantized_weight(), self.bias)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if params.mode == "token":
            out = self._per_row(rows, params)
        elif params.mode == "tensor" and self.fused:
            out = self._fused(rows, None, params.scale, params.zero_point, params.bits)
        elif params.mode == "tensor":
            out = self._row_range(
                rows, float(params.scale), int(params.zero_point), params.bits, self._packed_parts(None)
            )
        elif params.axis == "channel":
            out = self.channel_groups(rows, params)
        else:
            out = self._row_groups(rows, params)
        return out.view(*lead, self.out_features)

    def _row_range(self, rows, scale, zero_point, bits, parts) -> torch.Tensor:
        """Rows that share one (scale, zero point): per-tensor parameters, or one pixel group's rows."""
        codes = self.backend.quantize(rows, scale, zero_point, bits)
        out = self._gemm(codes, scale, zero_point, parts, self.bias)
        return out.addr_(_dequantized_row_sums(codes, scale, zero_point), self.zero_point_gap, alpha=-1)

    def channel_groups(self, inputs, params, to_rows=None) -> torch.Tensor:
        """The (M, N) output for channel groups, with the inputs' channel axis at dim 1; a fused backend that
        `writes_images` gives an unfolding's (B, K, L) (or `ImageTaps`') output as images (B, N, L).

        Args:
            inputs (`torch.Tensor`): (M, K) rows, or any tensor with K at dim 1 (an im2col unfolding (B, K, L)).
            params (`StepActParams`): the step's channel-group parameters.
            to_rows (`Callable | None`): turns a group's uint8 codes (the inputs' layout) into (M, K_g) rows. The
                groups are gathered and quantized in the inputs' own layout, where a group's channels are whole
                planes, and only their uint8 codes are transposed. Unused by a `fused_groups` backend, which reads
                the inputs in place.
        """
        plan = self._plan(params.labels, key=params.labels_key)
        if self.fused:
            return self._fused(inputs, plan.kernel_index, params.scale, params.zero_point, params.bits)
        scales, zero_points = params.scale[plan.groups], params.zero_point[plan.groups]
        gathered = plan.gather(inputs, 1)
        code_sums, out = None, None
        parts = zip(self._packed_parts(plan), scales.tolist(), zero_points.tolist(), strict=True)
        for part, ((_, packed), scale, zero_point) in enumerate(parts):
            codes = self.backend.quantize(plan.part(gathered, part, 1), scale, int(zero_point), params.bits)
            codes = codes if to_rows is None else to_rows(codes)
            if code_sums is None:
                code_sums = torch.empty(len(plan.groups), codes.shape[0], dtype=torch.int32, device=codes.device)
            bias = self.bias if out is None else None
            out = self.backend.linear(codes, scale, int(zero_point), packed, self.w_scale, bias, out)
            torch.sum(codes, dim=1, dtype=torch.int32, out=code_sums[part])
        # r[m] = sum over groups of s_g * (the group's code sum in row m - |g| * z_g)
        offset = (scales * zero_points * torch.tensor(plan.sizes(), device=scales.device)).sum()
        dq_row_sums = torch.addmv(-offset, code_sums.t().float(), scales)
        return out.addr_(dq_row_sums, self.zero_point_gap, alpha=-1)

    def _row_groups(self, rows, params) -> torch.Tensor:
        # Rows are (sample, pixel) pairs in sample-major order; the labels are per pixel.
        if self.fused:
            return self._fused(rows, None, params.scale, params.zero_point, params.bits, params.labels)
        row_labels = params.labels.repeat(rows.shape[0] // params.labels.numel())
        parts = self._packed_parts(None)
        out = torch.empty(rows.shape[0], self.out_features, device=rows.device)
        for group in torch.unique(row_labels).tolist():
            index = torch.nonzero(row_labels == group).flatten()
            scale, zero_point = float(params.scale[group]), int(params.zero_point[group])
            out.index_copy_(
                0, index, self._row_range(rows.index_select(0, index), scale, zero_point, params.bits, parts)
            )
        return out

    def _per_row(self, rows, params) -> torch.Tensor:
        """Per-row ranges (dynamic per-token): one GEMM of the raw codes, the row scales and zero points after it."""
        codes, scale, zero_point = quantize_activation(rows, params, "linear")
        codes, scale, zero_point = codes.to(torch.uint8), scale.view(-1), zero_point.view(-1)
        out = self._gemm(codes, 1.0, 0, self._packed_parts(None)).mul_(scale[:, None])
        dq_row_sums = scale * (codes.sum(dim=1, dtype=torch.int32).float() - codes.shape[1] * zero_point)
        # s_m * z_m * s_w[n] sum_k (W - o)  and  c[n] * r[m]
        corrections = torch.stack((scale * zero_point, dq_row_sums), dim=1)
        out.addmm_(corrections, torch.stack((self.row_sums, self.zero_point_gap)), alpha=-1)
        return out if self.bias is None else out.add_(self.bias)


def _dequantized_row_sums(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """`sum_k s (q - z)` of each row of uint8 codes."""
    return codes.sum(dim=1, dtype=torch.int32).float().sub_(codes.shape[1] * zero_point).mul_(scale)


class IntConv2d:
    """`y = conv2d(dq(q(x)), dq(W), b)` with DGQ's groups defined on the im2col unfolding, in integers.

    Per-tensor parameters and channel groups whose labels are (mostly) the same at every kernel tap run as the
    backend's native int8 convolution, one per group (see the module docstring); everything else runs as im2col +
    `IntLinear` on the unfolded input transposed to (B, L, Cin*kh*kw): DGQ's conv "channel" axis (Cin*kh*kw) becomes
    the contraction dim and its "pixel" axis (the L output locations) the rows.

    Args:
        backend (`GemmBackend`): the integer kernels.
        w_scale, w_zero_point (`torch.Tensor`): (Cout,) per-output-channel parameters.
        bits (`int`): weight code width.
        bias (`torch.Tensor | None`): (Cout,).
        in_channels (`int`), kernel_size, stride, padding, dilation (`tuple[int, int]`): the geometry.
    """

    def __init__(
        self, backend, w_scale, w_zero_point, bits, bias, in_channels, kernel_size, stride, padding, dilation
    ):
        self.backend: GemmBackend = backend
        self.bits, self.offset = bits, 1 << (bits - 1)
        self.out_channels, self.in_channels = w_scale.numel(), in_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self.w_scale, self.w_zero_point = w_scale.float(), w_zero_point.float()
        self.bias = None if bias is None else bias.float()
        # Native convolutions carry one more output channel, the group mask with scale 1: it accumulates
        # r = sum over the receptive field of dq(x), whose product with c[n] the weight zero point removes.
        self.native_scale = torch.cat((self.w_scale, self.w_scale.new_ones(1)))
        self.native_bias = None if bias is None else torch.cat((self.bias, self.bias.new_zeros(1)))
        self.zero_point_gap = (self.w_scale * (self.w_zero_point - self.offset)).view(1, -1, 1, 1)
        self.native_plans: dict[bytes, _GroupPlan] = {}
        self.linear: IntLinear | None = None

    @classmethod
    def from_quantized(
        cls,
        weight_codes: torch.Tensor,
        w_scale: torch.Tensor,
        w_zero_point: torch.Tensor,
        w_bits: int,
        bias: torch.Tensor | None,
        backend: GemmBackend,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        act_mode: str = "group",
        channel_labels: list[torch.Tensor] = (),
        row_params: bool = True,
        calibrated_positions: int | None = None,
    ) -> IntConv2d:
        """Take a resident quantized conv weight.

        Args:
            weight_codes (`torch.Tensor`): (Cout, Cin*kh*kw) uint8 codes in unfold order (`w.reshape(Cout, -1)`), or
                the same packed two per byte when `w_bits == 4`.
            w_scale, w_zero_point, w_bits, bias, backend: as for `IntLinear.from_quantized`.
            in_channels (`int`), kernel_size, stride, padding, dilation: the convolution's geometry.
            act_mode (`str`): the layer's activation mode; "tensor" prepares only the native convolution.
            channel_labels, row_params: as for `IntLinear.from_quantized`, on the unfolded input's axes; labellings
                that cannot run natively are sliced for im2col.
            calibrated_positions (`int | None`): output positions per sample at the calibrated size; channel groups
                of a convolution with fewer than `MIN_NATIVE_POSITIONS` run as im2col.
        """
        conv = cls(
            backend, w_scale, w_zero_point, w_bits, bias, in_channels, kernel_size, stride, padding, dilation
        )
        # A pointwise convolution is a GEMM over the pixels already: the linear path's groups accumulate in place,
        # where oneDNN's convolution copies its accumulator for every group (SD v1.5's 1x1 convolutions ran 2.5x
        # slower natively than as GEMMs).
        native = w_bits == 8 and backend.native_conv and not conv.pointwise
        im2col_labels = list(channel_labels)
        if native:
            centred = (weight_codes.to(torch.int16) - conv.offset).to(torch.int8)
            if act_mode == "tensor":
                conv.native_plans[b""] = conv._native_plan(None, centred)
            large = calibrated_positions is None or calibrated_positions >= MIN_NATIVE_POSITIONS
            if large and not backend.fused_groups:
                im2col_labels = [labels for labels in channel_labels if conv._try_native(labels, centred) is None]
        if not native or act_mode == "token" or (act_mode == "group" and (im2col_labels or row_params)):
            conv.linear = IntLinear.from_quantized(
                weight_codes, w_scale, w_zero_point, w_bits, bias, backend,
                in_channels * kernel_size[0] * kernel_size[1], im2col_labels, row_params,
            )  # fmt: skip
        return conv

    @property
    def geometry(self) -> tuple:
        return self.stride, self.padding, self.dilation

    def _try_native(
        self, labels: torch.Tensor, centred: torch.Tensor | None = None, key: bytes | None = None
    ) -> _GroupPlan | None:
        """The native plan of a channel labelling, made on first use; None when it duplicates too much weight."""
        key = labelling_key(labels) if key is None else key
        if key not in self.native_plans:
            tap_groups = TapGroups.of(labels, self.in_channels)
            if tap_groups.duplication > MAX_NATIVE_DUPLICATION:
                return None
            self.native_plans[key] = self._native_plan(
                tap_groups, self.centred_weight() if centred is None else centred
            )
        return self.native_plans[key]

    def _native_plan(self, tap_groups: TapGroups | None, centred: torch.Tensor) -> _GroupPlan:
        """One native convolution per group: the channels with a tap in it, other taps' weights zeroed, and the
        mask as an extra output channel. `tap_groups` None means one group, all weights."""
        weight = centred.view(self.out_channels, self.in_channels, -1)
        if tap_groups is None:
            mask = torch.ones(1, self.in_channels, weight.shape[2], dtype=torch.int8)
            packed = self.backend.pack_conv(
                torch.cat((weight, mask)).view(-1, *weight.shape[1:2], *self.kernel_size), *self.geometry
            )
            return _GroupPlan([-1], None, [0, self.in_channels], [packed])
        packed = []
        for channels, taps in zip(tap_groups.channels, tap_groups.taps, strict=True):
            mask = taps.to(torch.int8)
            sliced = torch.cat((weight[:, channels] * mask, mask[None]))
            packed.append(self.backend.pack_conv(sliced.view(-1, len(channels), *self.kernel_size), *self.geometry))
        return _GroupPlan.of(tap_groups.groups, tap_groups.channels, packed)

    def centred_weight(self) -> torch.Tensor:
        """(Cout, Cin*kh*kw) int8 `W - o` from the resident form."""
        if self.linear is not None:
            return self.linear.centred_weight()
        plan = next(iter(self.native_plans.values()))
        centred = torch.zeros(self.out_channels, self.in_channels, *self.kernel_size, dtype=torch.int8)
        for part, packed in enumerate(plan.packed):
            # Each tap belongs to one group; the other groups' slices hold zeros for it.
            channels = slice(None) if plan.order is None else plan.indices(part)
            centred[:, channels] += self.backend.unpack(packed)[: self.out_channels]
        return centred.view(self.out_channels, -1)

    def weight_codes(self) -> torch.Tensor:
        """(Cout, Cin*kh*kw) uint8 codes, unpacked."""
        return (self.centred_weight().to(torch.int16) + self.offset).to(torch.uint8)

    def resident_nbytes(self) -> int:
        native = sum(plan.nbytes for plan in self.native_plans.values())
        vectors = [self.native_scale, self.native_bias, self.zero_point_gap] if self.native_plans else []
        linear = 0 if self.linear is None else self.linear.resident_nbytes()
        return native + linear + sum(v.numel() * v.element_size() for v in vectors if v is not None)

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        return conv_output_size(x, self.kernel_size, self.stride, self.padding, self.dilation)

    def __call__(self, x: torch.Tensor, params: StepActParams) -> torch.Tensor:
        """The conv output (B, Cout, Ho, Wo) for input `x` (B, Cin, H, W) under one step's activation parameters."""
        if params.mode == "none":
            weight = self._float_weight().view(-1, self.in_channels, *self.kernel_size)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        plan = None
        if params.mode == "tensor":
            plan = self.native_plans.get(b"")
        elif params.mode == "group" and params.axis == "channel" and self.bits == 8 and self.native_plans:
            plan = None if self.backend.fused_groups else self._try_native(params.labels, key=params.labels_key)
        if plan is not None:
            return self._native(x, plan, params)
        return self._im2col(x, params)

    def _float_weight(self) -> torch.Tensor:
        return dequantize_uniform(self.weight_codes(), self.w_scale[:, None], self.w_zero_point[:, None])

    def _native(self, x: torch.Tensor, plan: _GroupPlan, params: StepActParams) -> torch.Tensor:
        gathered = plan.gather(x, 1)
        out = None
        for part, packed in enumerate(plan.packed):
            group = max(plan.groups[part], 0)
            scale, zero_point = float(params.scale[group]), int(params.zero_point[group])
            codes = self.backend.quantize(plan.part(gathered, part, 1), scale, zero_point, params.bits)
            bias = self.native_bias if out is None else None
            out = self.backend.conv(
                codes, scale, zero_point, packed, self.native_scale, self.geometry, bias, out
            )
        # The kernels write channels-last; the result is written in the UNet's own (contiguous) layout, so the next
        # ops (norms, residual adds, concatenations) do not each convert it back.
        result = torch.empty(out.shape[0], self.out_channels, *out.shape[2:], device=out.device)
        main, mask_sums = out[:, : self.out_channels], out[:, self.out_channels :]
        return torch.addcmul(main, mask_sums, self.zero_point_gap, value=-1, out=result)

    def _im2col(self, x: torch.Tensor, params: StepActParams) -> torch.Tensor:
        if self.linear is None:
            # A channel labelling first seen now that cannot run natively: slice it for im2col.
            codes = self.weight_codes()
            self.linear = IntLinear.from_quantized(
                codes, self.w_scale, self.w_zero_point, 8, self.bias, self.backend, codes.shape[1],
                [params.labels] if params.mode == "group" and params.axis == "channel" else [],
                row_params=params.mode != "group" or params.axis != "channel",
            )  # fmt: skip
        h_out, w_out = self.output_size(x)
        channel_groups = params.mode == "group" and params.axis == "channel"
        if self.pointwise:
            columns = x.flatten(2)
        elif channel_groups and self.linear.fused and self.backend.reads_image_taps and self.stride == (1, 1):
            columns = ImageTaps(x.contiguous(), self.kernel_size, self.padding, self.dilation, (h_out, w_out))
        else:
            columns = F.unfold(
                x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride
            )
        if channel_groups:
            rows = self.linear.channel_groups(columns, params, _unfolded_rows)
            if self.linear.fused and self.backend.writes_images:
                return rows.view(x.shape[0], -1, h_out, w_out)
        else:
            rows = self.linear(columns.transpose(1, 2), params).flatten(0, 1)
        # In the UNet's own (contiguous) layout, as `_native` writes it: a channels-last view would send the next
        # GroupNorm to its channels-last kernel, whose sums depend on the batch size (batch invariance).
        out = torch.empty(x.shape[0], rows.shape[1], h_out, w_out, device=rows.device, dtype=rows.dtype)
        return out.copy_(rows.view(x.shape[0], h_out, w_out, -1).permute(0, 3, 1, 2))


def _unfolded_rows(codes: torch.Tensor) -> torch.Tensor:
    """(B, K, L) codes of an im2col unfolding -> (B * L, K) GEMM rows."""
    return codes.transpose(1, 2).reshape(-1, codes.shape[1])
