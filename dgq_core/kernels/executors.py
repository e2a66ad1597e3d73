"""Integer execution of DGQ's quantized Linear and Conv2d, on any `GemmBackend`.

With activation codes `q` (per-row parameters `s_m, z_m`) and weight codes `W` (per-output-channel `s_w, z_w`):

    y[m, n] = s_m * s_w[n] * sum_k q[m, k] * (W[n, k] - z_w[n])  -  s_m * z_m * c[n]  +  b[n],
    c[n]    = s_w[n] * sum_k (W[n, k] - z_w[n]).

The backend computes the first term with the weight zero point removed inside its kernel. Per-tensor, dynamic
per-token and pixel-wise groups are all per-row parameters: one GEMM, a row scale and a rank-1 correction. Channel-wise
groups sit on the contraction dim: their columns are gathered group by group (the weight's columns are sliced by group
once per distinct labelling, offline) and the per-group GEMMs, each scaled by its group's scale, are summed in
float32; their zero points are constant over rows and fold into the bias. Convolutions run through im2col, because
DGQ defines conv groups on the unfolded input, except per-tensor parameters, where a native int8 convolution applies.

Weights stay resident in the backend's int8 form (W8), or as 4-bit codes packed two per byte (W4) that are widened
for the GEMM at each call; no floating-point copy is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers import StepActParams, conv_output_size, quantize_activation
from ..quantizers import dequantize_uniform, quantize_uniform, unpack_int4
from .gemm import GemmBackend, PackedWeight


@dataclass
class _ChannelPlan:
    """A weight sliced by one channel labelling: per present group, its column indices and weight slice.

    Args:
        group_ids (`list[int]`): ids of the non-empty groups.
        columns (`list[torch.Tensor]`): column indices of each group.
        packed (`list[PackedWeight] | None`): resident weight slices (W8); None when sliced per call (W4).
        column_sums (`torch.Tensor`): (G, N) `s_w[n] * sum_{k in g} (W[n, k] - z_w[n])` per present group.
    """

    group_ids: list[int]
    columns: list[torch.Tensor]
    packed: list[PackedWeight] | None
    column_sums: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.packed or []) + self.column_sums.numel() * 4


class IntLinear:
    """`y = linear(dq(q(x)), dq(W), b)` with integer GEMMs.

    Build with `from_quantized`; call with the input and the step's `StepActParams`.

    Resident weight: W8 keeps the backend's int8 form, once for the whole matrix if any step uses per-row parameters,
    plus once per distinct channel labelling as group slices; with no per-row step the slices are the only copy
    (per-row parameters then run over the slices). W4 keeps only the 4-bit codes packed two per byte and widens them
    per call.

    Args:
        backend (`GemmBackend`): the integer GEMM.
        w_scale, w_zero_point (`torch.Tensor`): (N,) per-output-channel parameters.
        bits (`int`): weight code width. in_features (`int`): K.
        bias (`torch.Tensor | None`): (N,) float32.
        nibbles (`torch.Tensor | None`): (N, ceil(K/2)) packed 4-bit codes for W4; None for W8.
    """

    def __init__(self, backend, w_scale, w_zero_point, bits, in_features, bias, nibbles=None) -> None:
        self.backend: GemmBackend = backend
        self.packed: PackedWeight | None = None
        self.nibbles = nibbles
        self.w_scale, self.w_zero_point = w_scale.float(), w_zero_point.float()
        self.bits, self.in_features, self.out_features = bits, in_features, w_scale.numel()
        self.bias = None if bias is None else bias.float()
        self.column_sums: torch.Tensor | None = None
        self._plans: dict[bytes, _ChannelPlan] = {}

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
            row_params (`bool`): whether any step uses per-row parameters (per-tensor, per-token, pixel groups);
                False keeps no whole-matrix copy next to the channel-group slices.
        """
        if w_bits not in (4, 8):
            raise ValueError(f"integer execution supports 8- and 4-bit weights, not {w_bits}")
        k = in_features if in_features is not None else weight_codes.shape[1] * (2 if w_bits == 4 else 1)
        nibbles = weight_codes.contiguous() if w_bits == 4 else None
        layer = cls(backend, w_scale, w_zero_point, w_bits, k, bias, nibbles)
        codes = layer.weight_codes() if w_bits == 4 else weight_codes
        layer.column_sums = layer._column_sums(codes, torch.arange(k, device=codes.device)).squeeze(0)
        for labels in channel_labels:
            layer._plan(labels, codes)
        if w_bits == 8 and (row_params or not layer._plans):
            layer.packed = backend.pack(codes, w_scale, w_zero_point, 8)
        return layer

    holds_codes = True

    def weight_codes(self) -> torch.Tensor:
        """(N, K) uint8 codes (unpacked from the resident form)."""
        if self.nibbles is not None:
            return unpack_int4(self.nibbles, self.in_features)
        if self.packed is not None:
            return self.backend.codes(self.packed)
        plan = next(iter(self._plans.values()))
        codes = torch.empty(
            self.out_features, self.in_features, dtype=torch.uint8, device=self.w_scale.device
        )
        for columns, packed in zip(plan.columns, plan.packed, strict=True):
            codes[:, columns] = self.backend.codes(packed)
        return codes

    def resident_nbytes(self) -> int:
        """Bytes this layer keeps: weight (whole and/or channel-group slices), scales, zero points, bias, sums."""
        if self.nibbles is not None:
            weight = self.nibbles.numel() + 8 * self.out_features
        else:
            weight = 0 if self.packed is None else self.packed.nbytes
        extra = (0 if self.bias is None else self.bias.numel() * 4) + self.column_sums.numel() * 4
        return weight + extra + sum(plan.nbytes for plan in self._plans.values())

    def dequantized_weight(self) -> torch.Tensor:
        """Float weight, only for inputs left unquantized (activation mode "none")."""
        return dequantize_uniform(self.weight_codes(), self.w_scale[:, None], self.w_zero_point[:, None])

    def _column_sums(self, codes: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        centred = codes.index_select(1, columns).float() - self.w_zero_point[:, None]
        return (self.w_scale * centred.sum(dim=1))[None]

    def _product(self, codes: torch.Tensor, x_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """`x_scale * s_w[n] * sum_k codes[m, k] (W[n, k] - z_w[n])` over all K, from whichever form is resident."""
        if self.packed is not None:
            return self.backend.matmul(codes, self.packed, x_scale)
        if self.nibbles is not None:
            packed = self.backend.pack(self.weight_codes(), self.w_scale, self.w_zero_point, 4)
            return self.backend.matmul(codes, packed, x_scale)
        plan = next(iter(self._plans.values()))
        out = None
        for columns, packed in zip(plan.columns, plan.packed, strict=True):
            part = self.backend.matmul(codes.index_select(1, columns), packed, x_scale)
            out = part if out is None else out.add_(part)
        return out

    def __call__(self, x: torch.Tensor, params: StepActParams) -> torch.Tensor:
        """The layer output for input `x` of shape (..., K) under one step's activation parameters."""
        if params.mode == "none":
            return F.linear(x, self.dequantized_weight(), self.bias)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if params.mode == "group" and params.axis == "channel":
            out = self._channel_groups(rows, params)
        else:
            codes, scale, zero_point = quantize_activation(x, params, "linear")
            out = self._row_params(codes.reshape(-1, self.in_features), scale, zero_point, lead)
        return out.view(*lead, self.out_features)

    def _row_params(self, codes, scale, zero_point, lead) -> torch.Tensor:
        if scale.numel() == 1:
            # One range: its zero point is a constant row, folded into the bias.
            out = self._product(codes, scale.reshape(()))
            return self._finish(out, -(scale * zero_point).reshape(()) * self.column_sums)
        row_scale = scale.expand(*lead, 1).reshape(-1, 1)
        row_offset = (scale * zero_point).expand(*lead, 1).reshape(-1)
        out = self._product(codes).mul_(row_scale)
        out.addr_(row_offset, self.column_sums, alpha=-1)
        return self._finish(out, None)

    def _finish(self, out: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        shift = offset if self.bias is None else (self.bias if offset is None else self.bias + offset)
        return out if shift is None else out.add_(shift)

    def _channel_groups(self, rows: torch.Tensor, params: StepActParams) -> torch.Tensor:
        plan = self._plan(params.labels)
        codes = quantize_activation(rows, params, "linear")[0]
        weights = plan.packed if plan.packed is not None else self._slices(plan.columns)
        out = None
        for group, columns, weight in zip(plan.group_ids, plan.columns, weights, strict=True):
            part = self.backend.matmul(codes.index_select(1, columns), weight, params.scale[group])
            out = part if out is None else out.add_(part)
        groups = torch.tensor(plan.group_ids, device=params.scale.device)
        offset = -(params.scale[groups] * params.zero_point[groups]) @ plan.column_sums
        return self._finish(out, offset)

    def _slices(self, columns: list[torch.Tensor]) -> list[PackedWeight]:
        """Per-call group slices of a W4 weight (its resident form stays the packed nibbles)."""
        codes = self.weight_codes()
        return [
            self.backend.pack(codes.index_select(1, c), self.w_scale, self.w_zero_point, 4) for c in columns
        ]

    def _plan(self, labels: torch.Tensor, codes: torch.Tensor | None = None) -> _ChannelPlan:
        # Labels may differ per sampler step; each distinct labelling gets its own weight slices (see BENCHMARKS.md).
        key = labels.to(torch.uint8).cpu().numpy().tobytes()
        if key not in self._plans:
            codes = self.weight_codes() if codes is None else codes
            group_ids = [int(g) for g in torch.unique(labels)]
            columns = [torch.nonzero(labels == g).flatten() for g in group_ids]
            sums = torch.cat([self._column_sums(codes, c) for c in columns])
            packed = None
            if self.bits == 8:
                packed = [
                    self.backend.pack(codes.index_select(1, c), self.w_scale, self.w_zero_point, 8)
                    for c in columns
                ]
            self._plans[key] = _ChannelPlan(group_ids, columns, packed, sums)
        return self._plans[key]


class IntConv2d:
    """`y = conv2d(dq(q(x)), dq(W), b)` with DGQ's groups defined on the im2col unfolding, in integers.

    Grouped and per-token parameters run as im2col + `IntLinear` on the unfolded input transposed to
    (B, L, Cin*kh*kw): DGQ's conv "channel" axis (Cin*kh*kw) becomes the contraction dim and its "pixel" axis (the
    L output locations) the rows. Per-tensor parameters use the backend's native int8 convolution when it has one.

    Args:
        linear (`IntLinear | None`): the (Cout, Cin*kh*kw) weight in unfold order as an integer linear layer.
        native (`object | None`): the backend's int8 convolution (per-tensor parameters, W8); exactly one of the two.
        bias (`torch.Tensor | None`): (Cout,).
        in_channels (`int`), kernel_size, stride, padding, dilation (`tuple[int, int]`): the geometry.
    """

    def __init__(self, linear, native, bias, in_channels, kernel_size, stride, padding, dilation) -> None:
        self.linear, self.native = linear, native
        self.bias = None if bias is None else bias.float()
        self.in_channels = in_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

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
    ) -> IntConv2d:
        """Take a resident quantized conv weight.

        Args:
            weight_codes (`torch.Tensor`): (Cout, Cin*kh*kw) uint8 codes in unfold order (`w.reshape(Cout, -1)`), or
                the same packed two per byte when `w_bits == 4`.
            w_scale, w_zero_point, w_bits, bias, backend: as for `IntLinear.from_quantized`.
            in_channels (`int`), kernel_size, stride, padding, dilation: the convolution's geometry.
            act_mode (`str`): the layer's activation mode; "tensor" prepares the backend's native int8 convolution
                (when it has one) instead of the im2col GEMM weight, so only one int8 copy is resident.
            channel_labels, row_params: as for `IntLinear.from_quantized`, on the unfolded input's axes.
        """
        geometry = (in_channels, kernel_size, stride, padding, dilation)
        if act_mode == "tensor" and w_bits == 8:
            codes = weight_codes.view(-1, in_channels, *kernel_size)
            native = backend.pack_conv(
                codes, w_scale.float(), w_zero_point.float(), 8, stride, padding, dilation
            )
            if native is not None:
                return cls(None, native, bias, *geometry)
        in_features = in_channels * kernel_size[0] * kernel_size[1]
        linear = IntLinear.from_quantized(
            weight_codes,
            w_scale,
            w_zero_point,
            w_bits,
            bias,
            backend,
            in_features,
            channel_labels,
            row_params,
        )
        return cls(linear, None, bias, *geometry)

    @property
    def holds_codes(self) -> bool:
        """Whether `weight_codes` can give the codes back (oneDNN's packed convolution weight cannot)."""
        return self.linear is not None

    def weight_codes(self) -> torch.Tensor:
        """(Cout, Cin*kh*kw) uint8 codes, unpacked."""
        return self.linear.weight_codes()

    def resident_nbytes(self) -> int:
        if self.linear is not None:
            return self.linear.resident_nbytes()
        return self.native.nbytes + (0 if self.bias is None else self.bias.numel() * 4)

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        return conv_output_size(x, self.kernel_size, self.stride, self.padding, self.dilation)

    def __call__(self, x: torch.Tensor, params: StepActParams) -> torch.Tensor:
        """The conv output (B, Cout, Ho, Wo) for input `x` (B, Cin, H, W) under one step's activation parameters."""
        if self.native is not None:
            if params.mode != "tensor":
                raise ValueError(
                    f"this convolution was prepared for per-tensor activations, got mode {params.mode!r}"
                )
            codes = quantize_uniform(x, params.scale, params.zero_point, params.bits)
            return self.native(codes, float(params.scale), int(params.zero_point), self.bias)
        if params.mode == "none":
            weight = self.linear.dequantized_weight().view(-1, self.in_channels, *self.kernel_size)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        h_out, w_out = self.output_size(x)
        if self.pointwise:
            columns = x.flatten(2)
        else:
            columns = F.unfold(
                x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride
            )
        out = self.linear(columns.transpose(1, 2), params)
        return out.transpose(1, 2).reshape(x.shape[0], -1, h_out, w_out)
