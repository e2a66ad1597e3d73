"""Outlier-preserving group quantization: range statistics, the outlier axis (D_d) and K-means groups.

For every quantized layer input DGQ records the per-index minimum and maximum along two candidate axes, picks the
axis whose ranges spread most (paper Eq. 1), clusters the indices of that axis into K groups on their (min, max)
points, and gives each group its own scale and zero point.

Axis names are semantic, whatever the tensor layout:
- Linear input `(..., P, C)`: "channel" is C (last dim), "pixel" is P (pixels or text tokens).
- Conv2d input, seen im2col-unfolded as `(B, C*kh*kw, L)`: "channel" is C*kh*kw, "pixel" is L (output locations).
- Attention Q/K/V `(B, heads, T, head_dim)`: "channel" is head_dim (shared by heads), "pixel" is T.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .quantizers import minmax_params

AXES = ("channel", "pixel")


@dataclass
class AxisRange:
    """Running per-index minimum and maximum along one axis (min of mins, max of maxes over batches)."""

    lo: torch.Tensor
    hi: torch.Tensor

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if lo.shape != self.lo.shape:
            raise ValueError(
                f"calibration inputs changed shape along a grouped axis ({tuple(self.lo.shape)} -> {tuple(lo.shape)}); "
                "calibrate at one image size"
            )
        torch.minimum(self.lo, lo, out=self.lo)
        torch.maximum(self.hi, hi, out=self.hi)


class RangeStats:
    """Per-axis range statistics of one layer input at one sampler step, and a random sample of its values when
    asked for (`add_sample`: the static probability scale searches its quantiles)."""

    def __init__(self) -> None:
        self.axes: dict[str, AxisRange] = {}
        # Spatial shape (h, w) of the pixel axis, when it is a grid; lets parameters follow other image sizes.
        self.pixel_grid: tuple[int, int] | None = None
        self._samples: list[torch.Tensor] = []

    def add_sample(self, x: torch.Tensor, count: int, generator: torch.Generator) -> None:
        """Keep `count` values of `x` drawn uniformly with replacement (all of them when it has fewer)."""
        flat = x.detach().reshape(-1)
        if flat.numel() > count:
            flat = flat[torch.randint(flat.numel(), (count,), generator=generator).to(flat.device)]
        self._samples.append(flat.float().cpu())

    def samples(self) -> torch.Tensor:
        """Every value `add_sample` kept, as one 1-D tensor."""
        if not self._samples:
            raise ValueError("no values were sampled at calibration; collect statistics with prob_scale='static'")
        return torch.cat(self._samples)

    def _merge(self, axis: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo, hi = lo.detach().float().cpu(), hi.detach().float().cpu()
        if axis in self.axes:
            self.axes[axis].merge(lo, hi)
        else:
            self.axes[axis] = AxisRange(lo.clone(), hi.clone())

    def update_linear(self, x: torch.Tensor, pixel_grid: tuple[int, int] | None = None) -> None:
        """Record a Linear input `(..., P, C)` (inputs with fewer than 3 dims are per-tensor; use `update_tensor`)."""
        flat = x.reshape(-1, x.shape[-2], x.shape[-1])
        self._merge("channel", flat.amin(dim=(0, 1)), flat.amax(dim=(0, 1)))
        self._merge("pixel", flat.amin(dim=(0, 2)), flat.amax(dim=(0, 2)))
        self.pixel_grid = pixel_grid

    def update_qkv(self, x: torch.Tensor, pixel_grid: tuple[int, int] | None = None) -> None:
        """Record attention Q/K/V `(B, heads, T, head_dim)`."""
        self._merge("channel", x.amin(dim=(0, 1, 2)), x.amax(dim=(0, 1, 2)))
        self._merge("pixel", x.amin(dim=(0, 1, 3)), x.amax(dim=(0, 1, 3)))
        self.pixel_grid = pixel_grid

    def update_conv(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> None:
        """Record a Conv2d input as its im2col unfolding would be seen, without materialising the unfolding.

        Entry (c, i, j) of the "channel" axis of the unfolded input holds input channel c shifted by kernel tap (i, j),
        so its range is the range of one strided slice of the zero-padded input; entry l of the "pixel" axis holds the
        receptive field of output location l, so its range is a max-pool of the channel-wise extremes.
        """
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        dh, dw = conv.dilation
        ph, pw = conv.padding if isinstance(conv.padding, tuple) else _same_padding(conv)
        padded = F.pad(x, (pw, pw, ph, ph))
        h_out = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
        w_out = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
        tap_lo, tap_hi = [], []
        for i in range(kh):
            for j in range(kw):
                tap = padded[:, :, i * dh : i * dh + (h_out - 1) * sh + 1 : sh, j * dw : j * dw + (w_out - 1) * sw + 1 : sw]
                tap_lo.append(tap.amin(dim=(0, 2, 3)))
                tap_hi.append(tap.amax(dim=(0, 2, 3)))
        # unfold orders the channel axis c-major, then kernel row, then kernel column.
        self._merge("channel", torch.stack(tap_lo, dim=1).flatten(), torch.stack(tap_hi, dim=1).flatten())
        pool = dict(kernel_size=(kh, kw), stride=(sh, sw), dilation=(dh, dw))
        pix_hi = F.max_pool2d(padded.amax(dim=1, keepdim=True), **pool).amax(dim=(0, 1))
        pix_lo = -F.max_pool2d(-padded.amin(dim=1, keepdim=True), **pool).amax(dim=(0, 1))
        self._merge("pixel", pix_lo.flatten(), pix_hi.flatten())
        self.pixel_grid = (h_out, w_out)

    def update_tensor(self, x: torch.Tensor) -> None:
        """Record only the whole-tensor range (per-tensor quantized inputs)."""
        self._merge("tensor", x.amin().reshape(1), x.amax().reshape(1))

    def tensor_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-tensor (lo, hi), from whichever statistics were recorded."""
        any_axis = next(iter(self.axes.values()))
        return any_axis.lo.min().reshape(1), any_axis.hi.max().reshape(1)


def _same_padding(conv: torch.nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    return tuple((d * (k - 1)) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))


def spread(axis_range: AxisRange) -> float:
    """D_d of paper Eq. 1: how far the per-index maxima and minima spread along an axis."""
    lo, hi = axis_range.lo, axis_range.hi
    return float((hi.max() - hi.min()) + (lo.max() - lo.min()))


def choose_axis(stats: RangeStats) -> str:
    """The outlier axis: the candidate axis with the larger D_d (ties go to "channel", as the official code does)."""
    return max(AXES, key=lambda axis: (spread(stats.axes[axis]), axis == "channel"))


def kmeans_labels(lo: torch.Tensor, hi: torch.Tensor, num_groups: int, seed: int = 0) -> torch.Tensor:
    """Cluster indices on their (min, max) points into at most `num_groups` groups.

    Args:
        lo (`torch.Tensor`): per-index minima, shape (N,), or (S, N) for ranges observed at S steps: an index is then
            the point of its S (min, max) pairs, so one labelling serves every step.
        hi (`torch.Tensor`): per-index maxima, shaped like `lo`.
        num_groups (`int`): K.
        seed (`int`): K-means seed (the official code uses `random_state=0`).

    Returns:
        `torch.Tensor` of int64 group ids, shape (N,), values in [0, num_groups).
    """
    lo, hi = lo.reshape(-1, lo.shape[-1]), hi.reshape(-1, hi.shape[-1])
    points = torch.cat((lo, hi)).T.double().numpy()
    distinct = len(np.unique(points, axis=0))
    k = min(num_groups, distinct)
    if k <= 1:
        return torch.zeros(len(points), dtype=torch.long)
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when fewer distinct points than clusters remain
        labels = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit_predict(points)
    return _relabel_by_range(torch.from_numpy(labels).long(), lo.min(dim=0).values)


def _relabel_by_range(labels: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Renumber groups by ascending minimum so identical clusterings get identical ids."""
    groups = labels.unique()
    order = sorted(groups.tolist(), key=lambda g: float(lo[labels == g].min()))
    remap = torch.empty(int(groups.max()) + 1, dtype=torch.long)
    for new_id, old_id in enumerate(order):
        remap[old_id] = new_id
    return remap[labels]


def group_params(
    lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor, num_groups: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group ('minmax' group mode): each group covers its members' full range.

    Groups without members (fewer distinct points than K) get the range [0, 1], as in the official code.

    Returns:
        `(scale, zero_point)`, each of shape (num_groups,).
    """
    group_lo = torch.zeros(num_groups)
    group_hi = torch.ones(num_groups)
    for g in range(num_groups):
        members = labels == g
        if members.any():
            group_lo[g] = lo[members].min()
            group_hi[g] = hi[members].max()
    return minmax_params(group_lo, group_hi, bits)


def tensor_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor min-max parameters whose range always contains 0 (the per-tensor initialisation of the method)."""
    return minmax_params(lo.min().clamp_max(0).reshape(1), hi.max().clamp_min(0).reshape(1), bits)
