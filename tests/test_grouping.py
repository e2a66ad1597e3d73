"""Outlier-axis choice, K-means groups, and the conv statistics shortcut against a real im2col unfolding."""

import torch
import torch.nn.functional as F

from dgq_core.grouping import RangeStats, choose_axis, group_params, kmeans_labels
from dgq_core.layers import ActQuantizer, StepState, fake_quant_activation


def test_channel_outliers_select_the_channel_axis():
    x = torch.randn(4, 64, 32)
    x[..., 5] += 40  # one channel always far out, whatever the pixel
    stats = RangeStats()
    stats.update_linear(x)
    assert choose_axis(stats) == "channel"


def test_pixel_outliers_select_the_pixel_axis():
    x = torch.randn(4, 64, 32)
    x[:, 17, :] += 40  # one pixel always far out, whatever the channel
    stats = RangeStats()
    stats.update_linear(x)
    assert choose_axis(stats) == "pixel"


def test_conv_statistics_equal_those_of_the_unfolded_input():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 11) + torch.linspace(-3, 3, 6)[None, :, None, None]
    stats = RangeStats()
    stats.update_conv(x, conv)
    unfolded = F.unfold(x, 3, padding=1, stride=2)  # (B, C*9, L)
    assert torch.allclose(stats.axes["channel"].lo, unfolded.amin(dim=(0, 2)))
    assert torch.allclose(stats.axes["channel"].hi, unfolded.amax(dim=(0, 2)))
    assert torch.allclose(stats.axes["pixel"].lo, unfolded.amin(dim=(0, 1)))
    assert torch.allclose(stats.axes["pixel"].hi, unfolded.amax(dim=(0, 1)))
    assert stats.pixel_grid == (5, 6)


def test_kmeans_puts_outlier_channels_in_their_own_group():
    lo = torch.full((40,), -1.0) + torch.rand(40) * 0.1
    hi = torch.full((40,), 1.0) + torch.rand(40) * 0.1
    hi[[3, 30]] = 50.0
    labels = kmeans_labels(lo, hi, 4)
    assert labels[3] == labels[30]
    assert (labels == labels[3]).sum() == 2
    scale, zero_point = group_params(lo, hi, labels, 4, 8)
    assert scale[labels[3]] > 10 * scale[labels[0]]


def test_kmeans_is_deterministic_and_handles_fewer_points_than_groups():
    lo, hi = torch.randn(50), torch.randn(50) + 3
    assert torch.equal(kmeans_labels(lo, hi, 8), kmeans_labels(lo, hi, 8))
    few = kmeans_labels(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 2.0]), 8)
    assert few.max() <= 1


def test_group_quantization_keeps_outliers_better_than_per_tensor():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    x[..., 7] = x[..., 7] * 60
    stats = RangeStats()
    stats.update_linear(x)
    state = StepState([1], (4, 4))
    grouped = ActQuantizer.from_stats([stats], "linear", "group", 6, 8, state, (4, 4))
    per_tensor = ActQuantizer.from_stats([stats], "linear", "tensor", 6, 1, state, (4, 4))
    normal = [c for c in range(64) if c != 7]
    grouped_err = (grouped(x) - x)[..., normal].pow(2).mean()
    tensor_err = (per_tensor(x) - x)[..., normal].pow(2).mean()
    assert grouped_err < tensor_err / 10
    assert (grouped(x)[..., 7] - x[..., 7]).abs().max() < 3.0  # the outlier itself is not clipped


def test_pixel_groups_follow_other_image_sizes():
    x = torch.randn(1, 16, 8)  # 4x4 latent grid at level 0
    x[:, :4, :] *= 50  # the top row holds outliers
    stats = RangeStats()
    stats.update_linear(x)
    state = StepState([1], (4, 4))
    quantizer = ActQuantizer.from_stats([stats], "linear", "group", 8, 2, state, (4, 4))
    params = quantizer.params(x.shape)
    assert params.axis == "pixel" and int(quantizer.pixel_level) == 0
    state.latent_hw = (8, 8)
    bigger = quantizer.params(torch.Size((1, 64, 8)))
    assert bigger.labels.shape == (64,)
    top = bigger.labels.view(8, 8)
    assert torch.equal(top[0], top[1]) and top[0, 0] == params.labels[0]
    assert fake_quant_activation(torch.randn(1, 64, 8), bigger, "linear").shape == (1, 64, 8)


def test_shared_channel_groups_label_every_channel_step_alike_and_keep_step_ranges():
    torch.manual_seed(0)
    steps = []
    for step in range(3):
        x = torch.randn(2, 16, 32)
        x[..., 5] *= 40 * (step + 1)  # the same outlier channel, growing step by step
        stats = RangeStats()
        stats.update_linear(x)
        steps.append(stats)
    state = StepState([900, 500, 100], (4, 4))
    per_step = ActQuantizer.from_stats(steps, "linear", "group", 8, 4, state, (4, 4))
    shared = ActQuantizer.from_stats(steps, "linear", "group", 8, 4, state, (4, 4), shared_channel_groups=True)
    assert (shared.axis == 0).all(), "outlier channels make every step group channels"
    assert all(torch.equal(shared.labels_channel[0], row) for row in shared.labels_channel)
    assert (shared.labels_channel[0] == shared.labels_channel[0][5]).sum() == 1, "the outlier keeps its own group"
    outlier_group = int(shared.labels_channel[0][5])
    assert shared.scale[2, outlier_group] > 2 * shared.scale[0, outlier_group], "scales still follow each step"
    assert per_step.labels_channel.shape == shared.labels_channel.shape
