"""Quantized Linear/Conv2d modules and the per-step activation quantizer they share with attention.

Every `ActQuantizer` reads its parameters for the calibrated call its UNet's `StepState` (`dgq_core.steps`) names.
Weights are resident as uint8 codes (4-bit codes packed two per byte) with per-output-channel scales and zero points;
no floating-point copy is kept.

Execution modes: "fake" quantizes and dequantizes in floating point and is the reference that defines the numbers;
"int" hands the quantized weight and the step's activation parameters to an integer executor that
`dgq_core.kernels` gives the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariance import batch_stable_conv2d, row_stable_linear
from .grouping import RangeStats, choose_axis, group_params, kmeans_labels, tensor_params
from .quantizers import (
    dequantize_uniform,
    dynamic_rowwise_params,
    fake_quant_uniform,
    pack_int4,
    quantize_uniform,
    quantize_weight_per_channel,
    unpack_int4,
)
from .steps import StepState

# How an input is laid out, which decides what "channel" and "pixel" mean (see grouping.py):
#   "linear": (..., P, C)   "conv": im2col (B, C*kh*kw, L)   "qkv": (B, heads, T, head_dim)   "vector": (B, C)
INPUT_KINDS = ("linear", "conv", "qkv", "vector")
# "group": calibrated groups along the outlier axis (DGQ); "tensor": one calibrated range; "token": per-row range
# computed at run time (dynamic baseline); "none": left in full precision.
ACT_MODES = ("group", "tensor", "token", "none")


def pixel_level(length: int, latent_hw: tuple[int, int], max_level: int = 8) -> int:
    """Which resolution level (latent size / 2^level) a flattened pixel axis of `length` belongs to; -1 if none.

    Text-token axes (77 tokens) never match a level of a latent grid, so they come back as -1.
    """
    h, w = latent_hw
    for level in range(max_level):
        if math.ceil(h / 2**level) * math.ceil(w / 2**level) == length:
            return level
    return -1


def grid_at_level(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    return math.ceil(latent_hw[0] / 2**level), math.ceil(latent_hw[1] / 2**level)


@dataclass
class StepActParams:
    """The activation quantization of one layer input at the current step, in the form kernels consume.

    Args:
        mode (`str`): one of ACT_MODES.
        bits (`int`): code width.
        axis (`str | None`): "channel" or "pixel" for mode "group".
        labels (`torch.Tensor | None`): group id per index along `axis` (mode "group").
        scale (`torch.Tensor | None`): per-group (K,) for "group", (1,) for "tensor"; None for "token"/"none".
        zero_point (`torch.Tensor | None`): same shape as `scale`.
        labels_key (`bytes | None`): `labelling_key(labels)`, which kernels key their per-labelling plans by; None:
            computed from `labels` where needed (which reads them back from a GPU).
    """

    mode: str
    bits: int
    axis: str | None = None
    labels: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    labels_key: bytes | None = None
    # `along`'s results: a quantizer keeps its steps' parameters, so each layout is gathered once, not at every call.
    _laid_out: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def along(
        self, dim: int, ndim: int, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale, zero point and reciprocal scale of a group-mode input, per index along `dim` of an `ndim`-dim
        tensor and broadcastable against it.

        Args:
            dim (`int`): the grouped dim.
            ndim (`int`): the input's number of dims.
            groups (`torch.Tensor | None`): the group of each index, when the input is not laid out as `labels`
                (a convolution's channel reads, `QuantConv2d`); always the same for one set of parameters.
        """
        key = (dim % ndim, ndim, groups is None)
        if key not in self._laid_out:
            shape = [1] * ndim
            shape[dim] = -1
            index = self.labels if groups is None else groups
            scale, zero_point = self.scale[index].view(shape), self.zero_point[index].view(shape)
            self._laid_out[key] = (scale, zero_point, torch.reciprocal(scale))
        return self._laid_out[key]


def labelling_key(labels: torch.Tensor) -> bytes:
    """Identity of a labelling (group per channel or pixel), by content."""
    return labels.to(torch.uint8).cpu().numpy().tobytes()


def axis_dim(kind: str, axis: str) -> int:
    """Tensor dim of a semantic axis for an input kind."""
    if kind == "conv":
        return -2 if axis == "channel" else -1
    return -1 if axis == "channel" else -2


def token_dim(kind: str) -> int:
    """Dim reduced by the dynamic per-token quantizer: a token's features."""
    return -2 if kind == "conv" else -1


def activation_params(
    x: torch.Tensor, params: StepActParams, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scale, zero point and (where kept) reciprocal scale of an input under one step's parameters, broadcastable
    against it; mode "none" is not allowed here.

    Args:
        x (`torch.Tensor`): the input, laid out as `kind` says.
        params (`StepActParams`): the step's parameters.
        kind (`str`): one of INPUT_KINDS.
    """
    if params.mode == "token":
        return (*dynamic_rowwise_params(x, params.bits, dim=token_dim(kind)), None)
    if params.mode == "tensor":
        return params.scale, params.zero_point, None
    if params.mode == "group":
        return params.along(axis_dim(kind, params.axis), x.dim())
    raise ValueError(f"mode {params.mode!r} has no codes")


def quantize_activation(
    x: torch.Tensor, params: StepActParams, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of an input under one step's parameters, with the scale and zero point broadcastable against them.

    Args:
        x (`torch.Tensor`): the input, laid out as `kind` says.
        params (`StepActParams`): the step's parameters; mode "none" is not allowed here.
        kind (`str`): one of INPUT_KINDS.

    Returns:
        `(codes, scale, zero_point)`: float codes shaped like `x`; scale and zero point broadcast against `x`.
    """
    scale, zero_point, inverse_scale = activation_params(x, params, kind)
    return quantize_uniform(x, scale, zero_point, params.bits, inverse_scale), scale, zero_point


def fake_quant_activation(x: torch.Tensor, params: StepActParams, kind: str) -> torch.Tensor:
    """Quantize-dequantize an input with one step's parameters: the reference every kernel must reproduce."""
    if params.mode == "none":
        return x
    scale, zero_point, inverse_scale = activation_params(x, params, kind)
    return fake_quant_uniform(x, scale, zero_point, params.bits, inverse_scale)


class ActQuantizer(nn.Module):
    """Per-step quantization parameters of one layer input.

    Buffers (S = calibrated steps, or 1 for a step-invariant input such as the text embedding):
        axis (S,) uint8: 0 = channel, 1 = pixel (mode "group").
        labels_channel (S, N_channel), labels_pixel (S, N_pixel) uint8: group id per index (mode "group").
        scale, zero_point (S, K): per group ("group") or (S, 1) ("tensor").
        pixel_level () int64: resolution level of the pixel axis, -1 when it is not a latent grid.

    Args:
        kind (`str`): input layout, one of INPUT_KINDS.
        mode (`str`): one of ACT_MODES.
        bits (`int`): code width.
        state (`StepState | None`): the UNet's step state; None for step-invariant inputs.
    """

    def __init__(self, kind: str, mode: str, bits: int, state: StepState | None) -> None:
        super().__init__()
        if kind not in INPUT_KINDS or mode not in ACT_MODES:
            raise ValueError(f"unknown input kind {kind!r} or mode {mode!r}")
        self.kind, self.mode, self.bits = kind, mode, bits
        self.state = state
        for name, dtype in (("axis", torch.uint8), ("labels_channel", torch.uint8), ("labels_pixel", torch.uint8)):
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self.register_buffer("scale", torch.zeros(0))
        self.register_buffer("zero_point", torch.zeros(0))
        self.register_buffer("pixel_level", torch.tensor(-1))
        self._resized_labels: dict[tuple, torch.Tensor] = {}
        # What `params` returns for each (step, pixel axis length, latent size), made at the first call: reading a
        # step's axis and labels back from a GPU at every call would stop the host at every layer (and CUDA graphs
        # cannot capture that).
        self._step_params: dict[tuple, StepActParams] = {}

    @classmethod
    def from_stats(
        cls,
        stats_per_step: list[RangeStats],
        kind: str,
        mode: str,
        bits: int,
        num_groups: int,
        state: StepState | None,
        calib_latent_hw: tuple[int, int],
        seed: int = 0,
        shared_channel_groups: bool = False,
        axis: str = "auto",
    ) -> ActQuantizer:
        """Turn per-step range statistics into per-step parameters (D_d axis choice, K-means, per-group ranges).

        `axis` "channel" or "pixel" groups every step along that axis instead of Eq. 1's choice (Table 3's ablation).

        With `shared_channel_groups`, the steps that group channels share one K-means labelling, fitted to all of
        their ranges at once; each step keeps its own per-group scale and zero point. Integer execution then keeps
        one group-sliced copy of the weight instead of one per distinct labelling.
        """
        quantizer = cls(kind, mode, bits, state)
        if mode in ("token", "none"):
            return quantizer
        steps = len(stats_per_step)
        if mode == "tensor":
            params = [tensor_params(*stats.tensor_range(), bits) for stats in stats_per_step]
            quantizer.scale = torch.stack([s for s, _ in params])
            quantizer.zero_point = torch.stack([z for _, z in params])
            return quantizer
        sizes = {name: stats_per_step[0].axes[name].lo.numel() for name in ("channel", "pixel")}
        axis_ids = torch.zeros(steps, dtype=torch.uint8)
        labels = {name: torch.zeros(steps, n, dtype=torch.uint8) for name, n in sizes.items()}
        scale = torch.zeros(steps, num_groups)
        zero_point = torch.zeros(steps, num_groups)
        axes = [choose_axis(stats) if axis == "auto" else axis for stats in stats_per_step]
        channel_steps = [step for step, step_axis in enumerate(axes) if step_axis == "channel"]
        shared_labels = None
        if shared_channel_groups and channel_steps:
            ranges = [stats_per_step[step].axes["channel"] for step in channel_steps]
            shared_labels = kmeans_labels(
                torch.stack([r.lo for r in ranges]), torch.stack([r.hi for r in ranges]), num_groups, seed=seed
            )
        for step, (stats, step_axis) in enumerate(zip(stats_per_step, axes, strict=True)):
            rng = stats.axes[step_axis]
            if step_axis == "channel" and shared_labels is not None:
                step_labels = shared_labels
            else:
                step_labels = kmeans_labels(rng.lo, rng.hi, num_groups, seed=seed)
            scale[step], zero_point[step] = group_params(rng.lo, rng.hi, step_labels, num_groups, bits)
            labels[step_axis][step] = step_labels.to(torch.uint8)
            axis_ids[step] = 0 if step_axis == "channel" else 1
        quantizer.axis = axis_ids
        quantizer.scale, quantizer.zero_point = scale, zero_point
        # Only keep label rows of an axis some step uses: the other axis' labels would be dead weight.
        for name, buffer in (("channel", "labels_channel"), ("pixel", "labels_pixel")):
            used = bool((axis_ids == (0 if name == "channel" else 1)).any())
            setattr(quantizer, buffer, labels[name] if used else torch.zeros(0, dtype=torch.uint8))
        if stats_per_step[0].pixel_grid is not None:
            grid = stats_per_step[0].pixel_grid
            level = pixel_level(grid[0] * grid[1], calib_latent_hw)
        else:
            level = pixel_level(sizes["pixel"], calib_latent_hw)
        quantizer.pixel_level = torch.tensor(level)
        return quantizer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Parameter shapes are only known after calibration, so loading replaces the (empty) buffers outright.
        for name in ("axis", "labels_channel", "labels_pixel", "scale", "zero_point", "pixel_level"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, state_dict[key].clone())
            elif strict:
                missing_keys.append(key)
        self._forget_params()

    def _apply(self, fn, recurse=True):
        # The cached parameters are views and copies of the buffers on their old device.
        self._forget_params()
        return super()._apply(fn, recurse)

    def _forget_params(self) -> None:
        self._resized_labels.clear()
        self._step_params.clear()

    @property
    def step(self) -> int:
        if self.state is None or self.scale.shape[0] <= 1:
            return 0
        return min(self.state.step, self.scale.shape[0] - 1)

    def params(self, x_shape: torch.Size | None = None) -> StepActParams:
        """Parameters for the current step, with pixel groups fitted to the current latent size."""
        if self.mode in ("token", "none"):
            return StepActParams(self.mode, self.bits)
        step = self.step
        if self.mode == "tensor":
            return StepActParams("tensor", self.bits, scale=self.scale[step], zero_point=self.zero_point[step])
        pixels = None if x_shape is None else x_shape[axis_dim(self.kind, "pixel")]
        key = (step, pixels, None if self.state is None else self.state.latent_hw)
        if key not in self._step_params:
            axis = "channel" if int(self.axis[step]) == 0 else "pixel"
            labels = (self.labels_channel if axis == "channel" else self.labels_pixel)[step].long()
            if axis == "pixel" and pixels is not None:
                labels = self._fit_pixel_labels(labels, step, pixels)
            self._step_params[key] = StepActParams(
                "group", self.bits, axis, labels, self.scale[step], self.zero_point[step], labelling_key(labels)
            )
        return self._step_params[key]

    def _fit_pixel_labels(self, labels: torch.Tensor, step: int, length: int) -> torch.Tensor:
        if labels.numel() == length:
            return labels
        level = int(self.pixel_level)
        if level < 0:
            raise ValueError(
                f"this layer's inputs had {labels.numel()} tokens at calibration and {length} now; "
                "text embeddings must keep the tokenizer's padded length"
            )
        calib_grid = grid_at_level(self.state.calib_latent_hw, level)
        grid = grid_at_level(self.state.latent_hw, level)
        if grid[0] * grid[1] != length:
            raise ValueError(f"cannot lay {length} pixels on a {grid} grid; is the image size a multiple of 8?")
        key = (step, grid)
        if key not in self._resized_labels:
            # Pixel groups are a property of image position; other sizes take the nearest calibrated position.
            planar = labels.view(1, 1, *calib_grid).float()
            self._resized_labels[key] = F.interpolate(planar, size=grid, mode="nearest").flatten().long()
        return self._resized_labels[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_activation(x, self.params(x.shape), self.kind)


def conv_output_size(x: torch.Tensor, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(H_out, W_out) of a zero-padded Conv2d over input `x` (B, C, H, W)."""
    sizes = []
    for i in range(2):
        span = dilation[i] * (kernel_size[i] - 1) + 1
        sizes.append((x.shape[2 + i] + 2 * padding[i] - span) // stride[i] + 1)
    return sizes[0], sizes[1]


@dataclass(frozen=True)
class TapGroups:
    """A convolution's channel labelling split by group. DGQ's conv "channel" axis is input channel x kernel tap, so
    group g reads the input channels with a tap in it, each through its taps in g; a channel whose taps straddle
    groups is read by each of them. A convolution whose groups read few channels twice runs natively, one group of
    channels at a time, instead of on the im2col unfolding.

    Args:
        in_channels (`int`): the convolution's input channels.
        groups (`list[int]`): the group ids present.
        channels (`list[torch.Tensor]`): per group, the (n_g,) input channels with a tap in it.
        taps (`list[torch.Tensor]`): per group, (n_g, kh*kw) bool: which taps of those channels are in it.
    """

    in_channels: int
    groups: list[int]
    channels: list[torch.Tensor]
    taps: list[torch.Tensor]

    @classmethod
    def of(cls, labels: torch.Tensor, in_channels: int) -> TapGroups:
        """Split `labels` (Cin*kh*kw, unfold order: channel-major, then kernel row, then column)."""
        by_channel = labels.view(in_channels, -1)
        groups = torch.unique(by_channel).tolist()
        channels, taps = [], []
        for group in groups:
            in_group = by_channel == group
            channels.append(torch.nonzero(in_group.any(dim=1)).flatten())
            taps.append(in_group[channels[-1]])
        return cls(in_channels, groups, channels, taps)

    @property
    def duplication(self) -> float:
        """Channel reads beyond one per input channel, as a fraction of the input channels."""
        return sum(len(channels) for channels in self.channels) / self.in_channels - 1


class QuantizedWeight(nn.Module):
    """A weight resident as per-output-channel asymmetric codes: uint8, or 4-bit packed two per byte.

    Buffers: `codes` (out, in') uint8 (in' = ceil(in/2) when packed), `scale` (out,), `zero_point` (out,).
    """

    def __init__(self, shape: tuple[int, ...], bits: int) -> None:
        super().__init__()
        self.shape, self.bits = tuple(shape), bits
        out_features, in_features = shape[0], math.prod(shape[1:])
        stored = math.ceil(in_features / 2) if bits == 4 else in_features
        self.register_buffer("codes", torch.zeros(out_features, stored, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("zero_point", torch.zeros(out_features))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int) -> QuantizedWeight:
        quantized = cls(weight.shape, bits)
        codes, scale, zero_point = quantize_weight_per_channel(weight, bits)
        codes = codes.reshape(weight.shape[0], -1)
        quantized.codes = pack_int4(codes) if bits == 4 else codes
        quantized.scale, quantized.zero_point = scale, zero_point
        return quantized

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])

    def unpacked_codes(self) -> torch.Tensor:
        """(out, in) uint8 codes."""
        return unpack_int4(self.codes, self.in_features) if self.bits == 4 else self.codes

    def dequantize(self) -> torch.Tensor:
        """The float weight the codes represent, in its original shape."""
        codes = self.unpacked_codes()
        return dequantize_uniform(codes, self.scale[:, None], self.zero_point[:, None]).reshape(self.shape)


class QuantizedLayer(nn.Module):
    """What `QuantLinear` and `QuantConv2d` share: a resident quantized weight, the quantizer of their input, and in
    exec mode "int" an integer executor (`dgq_core.kernels.set_exec_mode`), in which an 8-bit weight then lives
    alone: the code buffer is emptied so that no second copy stays resident.

    Args:
        weight_q (`QuantizedWeight`): the weight's codes, scales and zero points.
        bias (`bool`): whether the layer has a bias (float, loaded with the checkpoint).
        act (`ActQuantizer`): the input's quantizer.
    """

    def __init__(self, weight_q: QuantizedWeight, bias: bool, act: ActQuantizer) -> None:
        super().__init__()
        self.weight_q = weight_q
        out_features = weight_q.shape[0]
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.act = act
        self.int_executor = None
        self.register_state_dict_post_hook(_codes_into_state_dict)

    def drop_int_executor(self) -> None:
        """Return to the fake-quant reference, taking an 8-bit weight's codes back from the executor."""
        if self.int_executor is None:
            return
        if self.weight_q.codes.numel() == 0:
            self.weight_q.codes = self.int_executor.weight_codes()
        self.int_executor = None

    def _apply(self, fn, recurse=True):
        # An executor's packed weights belong to the device they were made on: moving (or casting) the layer returns
        # it to the reference first, so that its codes move with it; `set_exec_mode` makes new executors there.
        self.drop_int_executor()
        return super()._apply(fn, recurse)

    def _copy_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias.data.copy_(bias.detach().float())


def _codes_into_state_dict(layer: QuantizedLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A layer's state holds its weight codes in every exec mode: in "int" they come back from the executor."""
    key = f"{prefix}weight_q.codes"
    if layer.int_executor is not None and key in state_dict and state_dict[key].numel() == 0:
        state_dict[key] = layer.int_executor.weight_codes()


class QuantLinear(QuantizedLayer):
    """`nn.Linear` with a quantized weight and a per-step activation quantizer on its input."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int, act: ActQuantizer) -> None:
        super().__init__(QuantizedWeight((out_features, in_features), w_bits), bias, act)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(
        cls, linear: nn.Linear, w_bits: int, act: ActQuantizer, weight_q: QuantizedWeight | None = None
    ) -> QuantLinear:
        """A quantized copy of `linear`; `weight_q`: its weight already quantized (AdaRound), else rounded to nearest."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w_bits, act)
        module.weight_q = weight_q if weight_q is not None else QuantizedWeight.from_float(linear.weight, w_bits)
        module._copy_bias(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_executor is not None:
            return self.int_executor(x, self.act.params(x.shape))
        weight = self.weight_q.dequantize().to(x.dtype)
        return row_stable_linear(self.act(x), weight, None if self.bias is None else self.bias.to(x.dtype))


# Fake quantization runs a channel-grouped convolution natively when its groups read at most this fraction of its
# input channels a second time (`TapGroups.duplication`); beyond that, on the im2col unfolding. The native form does
# (1 + duplication) times the convolution's multiply-adds where im2col + GEMM does them once but copies and quantizes
# kh*kw times the input.
MAX_FAKE_DUPLICATION = 1.0


@dataclass(frozen=True)
class _ChannelReads:
    """The input channels a channel-grouped convolution reads natively, group after group (`TapGroups`).

    Args:
        order (`torch.Tensor | None`): (C',) the input channel of each read; None: each channel once, in order.
        groups (`torch.Tensor`): (C',) the group whose parameters quantize each read.
        tap_mask (`torch.Tensor | None`): (C', kh, kw) 1 where a read's tap is in its group; None: all of them.
    """

    order: torch.Tensor | None
    groups: torch.Tensor
    tap_mask: torch.Tensor | None

    @classmethod
    def of(cls, tap_groups: TapGroups, kernel_size: tuple[int, int]) -> _ChannelReads:
        order = torch.cat(tap_groups.channels)
        groups = torch.cat([torch.full_like(c, g) for g, c in zip(tap_groups.groups, tap_groups.channels, strict=True)])
        tap_mask = torch.cat(tap_groups.taps)
        if len(order) == tap_groups.in_channels and bool(tap_mask.all()):
            return cls(None, groups[torch.argsort(order)], None)
        return cls(order, groups, tap_mask.view(-1, *kernel_size).float())


class QuantConv2d(QuantizedLayer):
    """`nn.Conv2d` with a quantized weight; grouped activations are quantized on the im2col unfolding, as DGQ defines.

    In fake quantization, channel groups that read few channels twice run as one native convolution over the
    channels each group reads (`_ChannelReads`): quantizing the zero-padded input elementwise gives the unfolding's
    values, padding included, without materializing the unfolding.
    """

    def __init__(self, conv: nn.Conv2d, w_bits: int, act: ActQuantizer) -> None:
        if conv.groups != 1:
            raise ValueError("grouped convolutions are not quantized (SD UNets have none)")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero-padded convolutions with explicit padding are quantized")
        weight_q = QuantizedWeight((conv.out_channels, conv.in_channels, *conv.kernel_size), w_bits)
        super().__init__(weight_q, conv.bias is not None, act)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding = conv.padding
        self._channel_reads: dict[bytes, _ChannelReads | None] = {}  # per labelling; None: it runs as im2col

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, w_bits: int, act: ActQuantizer, weight_q: QuantizedWeight | None = None
    ) -> QuantConv2d:
        """A quantized copy of `conv`; `weight_q`: its weight already quantized (AdaRound), else rounded to nearest."""
        module = cls(conv, w_bits, act)
        module.weight_q = weight_q if weight_q is not None else QuantizedWeight.from_float(conv.weight, w_bits)
        module._copy_bias(conv.bias)
        return module

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        return conv_output_size(x, self.kernel_size, self.stride, self.padding, self.dilation)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_out, w_out = self.output_size(x)
        act_params = self.act.params(torch.Size((x.shape[0], 0, h_out * w_out)))
        if self.int_executor is not None:
            return self.int_executor(x, act_params)
        weight = self.weight_q.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if act_params.mode in ("tensor", "none"):
            # A single range commutes with im2col (its zero point is exact, so padding stays 0): plain conv.
            x = fake_quant_activation(x, act_params, "linear")
            return batch_stable_conv2d(x, weight, bias, stride=self.stride, padding=self.padding, dilation=self.dilation)
        if act_params.mode == "group" and act_params.axis == "channel":
            reads = self._reads_of(act_params)
            if reads is not None:
                return self._native_channel_groups(x, weight, bias, act_params, reads)
        columns = fake_quant_activation(self.unfold(x), act_params, "conv")
        out = weight.reshape(self.out_channels, -1) @ columns
        if bias is not None:
            out = out + bias[:, None]
        return out.reshape(x.shape[0], self.out_channels, h_out, w_out)

    def _reads_of(self, act_params: StepActParams) -> _ChannelReads | None:
        if act_params.labels_key not in self._channel_reads:
            tap_groups = TapGroups.of(act_params.labels, self.in_channels)
            fits = tap_groups.duplication <= MAX_FAKE_DUPLICATION
            self._channel_reads[act_params.labels_key] = _ChannelReads.of(tap_groups, self.kernel_size) if fits else None
        return self._channel_reads[act_params.labels_key]

    def _native_channel_groups(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act_params: StepActParams,
        reads: _ChannelReads,
    ) -> torch.Tensor:
        (pad_h, pad_w) = self.padding
        if pad_h or pad_w:  # the padding's zeros are quantized with their group's parameters, as in the unfolding
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        if reads.order is not None:
            x = x.index_select(1, reads.order)
            weight = weight.index_select(1, reads.order) * reads.tap_mask
        scale, zero_point, inverse_scale = act_params.along(1, 4, reads.groups)
        x = fake_quant_uniform(x, scale, zero_point, act_params.bits, inverse_scale)
        return batch_stable_conv2d(x, weight, bias, stride=self.stride, padding=0, dilation=self.dilation)

    def _apply(self, fn, recurse=True):
        self._channel_reads.clear()  # their index tensors belong to the device they were made on
        return super()._apply(fn, recurse)
