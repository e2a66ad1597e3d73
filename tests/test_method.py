"""The method's own tests (`pytest -m method`): each pins one equation or rule of DGQ and of its weight recipe, and
fails when that equation is changed by one line (docs: BENCHMARKS.md, "The method's tests", lists the changes tried).

Eq. 1 (the outlier axis), K-means groups, group ranges, Eq. 3 (uniform and log rounding), Eq. 8 (the dynamic scale:
without `<start>`, one per sample), the step switching during a real generation, the base-sqrt(2) and uniform
variants, Table 3's switches (static scale, no start split, forced axis), the weight range search's Lp norm,
AdaRound (soft rounding from the float weight, its schedule, codes within one of nearest, stored as the codes) and
statistics from the quantized model.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import build_tiny_sd

import dgq_core
from dgq_core.attention import DGQAttnProcessor, quantize_probs_per_sample, sample_scale, static_prob_scale
from dgq_core.calibration import collect_unet_stats
from dgq_core.config import DGQConfig
from dgq_core.grouping import AxisRange, RangeStats, choose_axis, group_params, kmeans_labels, spread
from dgq_core.layers import ActQuantizer
from dgq_core.quantizers import (
    fake_quant_uniform,
    minmax_params,
    quantize_log2,
    quantize_uniform,
    weight_range_search,
)
from dgq_core.reconstruction import (
    AdaRoundLayer,
    AdaRoundRecipe,
    _Cached,
    _learn_unit,
    _unit_loss,
    initial_alpha,
    lp_loss,
    rectified_sigmoid,
    rounding_regularizer,
)
from dgq_core.steps import StepState

pytestmark = pytest.mark.method

PROMPTS = ["a red circle", "a blue square on green", "small yellow triangle", "big purple star"]
STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (10x the time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Eq. 1: the outlier axis -------------------------------------------------------------------------------------


def _stats(channel: tuple[list[float], list[float]], pixel: tuple[list[float], list[float]]) -> RangeStats:
    stats = RangeStats()
    for axis, (lo, hi) in (("channel", channel), ("pixel", pixel)):
        stats.axes[axis] = AxisRange(torch.tensor(lo), torch.tensor(hi))
    return stats


def test_eq1_spread_sums_the_spread_of_the_maxima_and_of_the_minima_and_the_larger_axis_wins():
    assert spread(AxisRange(torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([3.0, 1.0, 2.0]))) == pytest.approx(6.0)
    # Outliers only among the minima (channel) vs a smaller spread among the maxima (pixel): the minima count.
    low_outlier = _stats(channel=([-1.0, -9.0, -1.0], [1.0, 1.0, 1.0]), pixel=([-1.0, -1.0], [1.0, 4.0]))
    assert choose_axis(low_outlier) == "channel"
    # And the other way round: the maxima count.
    high_outlier = _stats(channel=([-1.0, -1.0], [1.0, 2.0]), pixel=([-1.0, -2.0, -1.0], [1.0, 8.0, 1.0]))
    assert choose_axis(high_outlier) == "pixel"


# --- K-means groups and their ranges -----------------------------------------------------------------------------


def test_kmeans_groups_indices_by_their_min_and_max_together():
    # Three kinds of index: ordinary, a low outlier (only its minimum differs), a high outlier (only its maximum).
    generator = torch.Generator().manual_seed(0)
    lo = torch.full((30,), -1.0) + 0.05 * torch.rand(30, generator=generator)
    hi = torch.full((30,), 1.0) + 0.05 * torch.rand(30, generator=generator)
    lo[[2, 11, 23]] = -30.0
    hi[[5, 17, 28]] = 30.0
    labels = kmeans_labels(lo, hi, 3)
    groups = {frozenset(torch.nonzero(labels == g).flatten().tolist()) for g in labels.unique().tolist()}
    assert frozenset({2, 11, 23}) in groups and frozenset({5, 17, 28}) in groups and len(groups) == 3


@pytest.mark.parametrize("bits", [8, 6])
def test_group_ranges_cover_every_member_and_no_more(bits):
    generator = torch.Generator().manual_seed(1)
    lo = -torch.rand(64, generator=generator) * torch.logspace(-1, 1, 64)
    hi = torch.rand(64, generator=generator) * torch.logspace(1, -1, 64)
    labels = kmeans_labels(lo, hi, 8)
    scale, zero_point = group_params(lo, hi, labels, 8, bits)
    for g in labels.unique().tolist():
        members = labels == g
        step = float(scale[g])
        covered_lo = -float(zero_point[g]) * step
        covered_hi = (2**bits - 1 - float(zero_point[g])) * step
        # The zero point is rounded to an integer: the covered range may move by half a step.
        assert covered_lo <= float(lo[members].min()) + step / 2 + 1e-6
        assert covered_hi >= float(hi[members].max()) - step / 2 - 1e-6
        assert step == pytest.approx(float(hi[members].max() - lo[members].min()) / (2**bits - 1), rel=1e-5)


# --- Eq. 3: rounding ---------------------------------------------------------------------------------------------


def test_eq3_uniform_codes_round_to_nearest_and_clamp_to_the_code_range():
    x = torch.rand(20000, generator=torch.Generator().manual_seed(10)) * 6 - 3
    scale, zero_point = minmax_params(torch.tensor(-1.0), torch.tensor(2.0), 8)
    codes = quantize_uniform(x, scale, zero_point, 8)
    exact = x.double() / scale.double()
    expected = torch.clamp(torch.round(exact) + zero_point.double(), 0, 255)
    off_ties = (exact - exact.floor() - 0.5).abs() > 1e-4  # float32 may round a near-tie either way
    assert torch.equal(codes.double()[off_ties], expected[off_ties])
    inside = (x >= -1) & (x <= 2)
    assert float((fake_quant_uniform(x, scale, zero_point, 8) - x)[inside].abs().max()) <= float(scale) / 2 + 1e-6
    assert float(codes.min()) == 0 and float(codes.max()) == 255


def test_eq3_log_codes_round_in_the_log_domain():
    scale = torch.tensor(0.5)
    k = torch.arange(0, 20, dtype=torch.float32)
    for offset, expected in ((0.45, k), (-0.45, k), (0.55, k + 1)):
        p = scale * torch.exp2(-(k + offset))
        assert torch.equal(quantize_log2(p, scale, 8), expected.clamp(0, 255))
        # The float-bits path that attention runs rounds at the same boundaries.
        fake = quantize_probs_per_sample(p.view(1, 1, 1, -1).clone(), 8, False, "log2", scale)
        assert torch.equal(fake.flatten(), scale * torch.exp2(-expected))
    # Above the code range: the smallest level.
    assert float(quantize_log2(torch.tensor([1e-30]), scale, 4)) == 15


# --- Eq. 8: the dynamic scale -------------------------------------------------------------------------------------


def _cross_attention_probs(generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(torch.randn(2, 2, 6, 9, generator=generator) * 2, dim=-1)
    probs[..., 0] += 2.0  # `<start>` carries most of the mass, as in cross-attention
    return probs / probs.sum(-1, keepdim=True)


def test_eq8_the_scale_leaves_out_the_start_column_and_the_largest_other_probability_is_exact():
    probs = _cross_attention_probs(torch.Generator().manual_seed(2))
    assert torch.equal(sample_scale(probs, keep_start=True).flatten(), probs[..., 1:].amax(dim=(1, 2, 3)))
    out = quantize_probs_per_sample(probs.clone(), 6, keep_start=True, quantizer="log2")
    assert torch.equal(out[..., 0], probs[..., 0])
    for sample in range(2):
        largest = probs[sample, ..., 1:].max()
        assert bool((out[sample, ..., 1:] == largest).any()), "code 0 is the sample's largest non-start probability"


def test_eq8_one_scale_per_sample():
    probs = _cross_attention_probs(torch.Generator().manual_seed(3))
    probs[1, ..., 1:] *= 0.05  # the second sample's other probabilities are much smaller
    probs[1, ..., 0] = 1 - probs[1, ..., 1:].sum(-1)
    assert sample_scale(probs, keep_start=True).shape == (2, 1, 1, 1)
    together = quantize_probs_per_sample(probs.clone(), 6, keep_start=True)
    for sample in range(2):
        alone = quantize_probs_per_sample(probs[sample : sample + 1].clone(), 6, keep_start=True)
        assert torch.equal(together[sample], alone[0])


def test_the_log_sqrt2_and_uniform_variants_keep_the_scale_and_change_only_the_codes():
    probs = torch.softmax(torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(4)) * 4, dim=-1)
    scale = probs.max()
    fine = quantize_probs_per_sample(probs.clone(), 8, keep_start=False, quantizer="log-sqrt2")
    half_octaves = -2 * torch.log2(fine / scale)
    assert torch.allclose(half_octaves, half_octaves.round(), atol=1e-4)
    assert bool((half_octaves.round() % 2 == 1).any()), "odd codes (the half steps) are used"
    assert float((fine / probs).log2().abs().max()) <= 0.25 + 1e-5
    uniform = quantize_probs_per_sample(probs.clone(), 6, keep_start=False, quantizer="uniform")
    steps = uniform / (scale / 63)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert float((uniform - probs).abs().max()) <= float(scale) / 63 / 2 + 1e-7


# --- Table 3's switches ----------------------------------------------------------------------------------------


def test_static_scale_is_the_quantile_with_the_least_squared_error_and_clamps_what_is_above():
    generator = torch.Generator().manual_seed(5)
    samples = torch.softmax(torch.randn(64, 64, generator=generator) * 3, dim=-1).flatten()
    chosen = static_prob_scale(samples, 6, "log2")
    candidates = torch.quantile(samples, torch.tensor([0.999, 0.9999, 0.99999]))

    def error(scale):
        return float((quantize_probs_per_sample(samples.view(1, 1, 1, -1).clone(), 6, False, "log2", scale, False)
                      - samples).pow(2).sum())  # fmt: skip

    errors = [error(c) for c in candidates]
    assert float(chosen) == pytest.approx(float(candidates[errors.index(min(errors))]))
    assert len({round(e, 12) for e in errors}) == 3, "the candidates differ, so the choice means something"
    clamped = quantize_probs_per_sample(samples.view(1, 1, 1, -1).clone(), 6, False, "log2", chosen, False)
    assert float(clamped.max()) == pytest.approx(float(chosen))


def test_without_the_start_split_the_start_column_is_quantized_and_in_the_scale():
    probs = _cross_attention_probs(torch.Generator().manual_seed(6))
    out = quantize_probs_per_sample(probs.clone(), 6, keep_start=False)
    assert not torch.equal(out[..., 0], probs[..., 0])
    assert torch.equal(sample_scale(probs, keep_start=False).flatten(), probs.amax(dim=(1, 2, 3)))
    quantizers = {q: ActQuantizer("qkv", "none", 6, None) for q in ("q_quant", "k_quant", "v_quant")}
    state = StepState([1], (2, 2))
    assert DGQAttnProcessor("dgq", 6, True, state=state, **quantizers).keep_start
    assert not DGQAttnProcessor("dgq", 6, True, state=state, start_split=False, **quantizers).keep_start


def test_a_forced_axis_overrides_eq1_at_every_step():
    x = torch.randn(4, 64, 32)
    x[..., 5] += 40  # Eq. 1 picks the channel axis
    stats = RangeStats()
    stats.update_linear(x)
    auto = ActQuantizer.from_stats([stats, stats], "linear", "group", 8, 4, None, (8, 8))
    forced = ActQuantizer.from_stats([stats, stats], "linear", "group", 8, 4, None, (8, 8), axis="pixel")
    assert auto.axis.tolist() == [0, 0] and forced.axis.tolist() == [1, 1]


# --- Weights: the range search and AdaRound ----------------------------------------------------------------------


def test_weight_range_search_minimizes_the_lp_error_with_p_2_4():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(7))
    weight[:, 0] *= 6
    scale, zero_point = weight_range_search(weight, 4)
    lo, hi = weight.amin(1), weight.amax(1)

    def best(p: float) -> torch.Tensor:
        errors = []
        for step in range(80):
            s, z = minmax_params(lo * (1 - 0.01 * step), hi * (1 - 0.01 * step), 4)
            errors.append((fake_quant_uniform(weight, s[:, None], z[:, None], 4) - weight).abs().pow(p).sum(1))
        chosen = torch.stack(errors).argmin(0)
        return minmax_params(lo * (1 - 0.01 * chosen), hi * (1 - 0.01 * chosen), 4)[0]

    assert torch.allclose(scale, best(2.4))
    assert not torch.allclose(best(2.0), best(2.4)), "p = 2 would choose other ranges here"


def test_adaround_starts_at_the_float_weight_and_anneals_its_regularizer_after_the_warmup():
    layer = AdaRoundLayer(torch.nn.Linear(16, 8), 4)
    remainder = torch.rand(1000, generator=torch.Generator().manual_seed(8)) * 0.98 + 0.01
    assert torch.allclose(rectified_sigmoid(initial_alpha(remainder)), remainder, atol=1e-5)
    layer.start_learning()
    inside = (layer.floor + 1 + layer.zero_point <= 15) & (layer.floor + layer.zero_point >= 0)
    soft = layer.weight().reshape(8, -1)
    assert torch.allclose(soft[inside], layer.module.weight[inside], atol=1e-5)
    recipe = AdaRoundRecipe(iters=1000)
    assert not recipe.regularized(199) and recipe.regularized(200)
    assert recipe.beta(200) == 20 and recipe.beta(600) == pytest.approx(11) and recipe.beta(1000) == 2
    h = torch.tensor([0.0, 1.0, 0.5, 0.75])
    assert float(rounding_regularizer(h, 2.0)) == pytest.approx(0 + 0 + 1 + 0.75)
    output, target = torch.tensor([[1.0, -2.0], [0.0, 0.5]]), torch.zeros(2, 2)
    assert float(lp_loss(output, target, 2.4)) == pytest.approx((1 + 2**2.4 + 0 + 0.5**2.4) / 2)


def test_adaround_rounds_each_weight_to_floor_or_ceiling_and_reconstructs_better_than_nearest():
    torch.manual_seed(9)
    unit = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    inputs = torch.randn(256, 24) @ torch.randn(24, 24)  # correlated inputs: rounding errors add up unevenly
    target = unit(inputs).detach()
    layers = [AdaRoundLayer(unit[0], 4), AdaRoundLayer(unit[2], 4)]
    quantized = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1])
    cached = _Cached([inputs], {})
    nearest = _unit_loss(quantized, cached, target, 2.4, torch.device("cpu"))
    recipe = AdaRoundRecipe(iters=800)
    _learn_unit(quantized, layers, cached, target, recipe, torch.device("cpu"), torch.Generator().manual_seed(0), None)
    learned = _unit_loss(quantized, cached, target, 2.4, torch.device("cpu"))
    assert learned < 0.9 * nearest
    for layer in layers:
        codes = layer.codes()
        floor = (layer.floor + layer.zero_point).clamp(0, 15)
        assert bool(((codes == floor) | (codes == (floor + 1).clamp(0, 15))).all())
        assert float((codes - layer.nearest).abs().max()) <= 1
        assert bool((codes != layer.nearest).any())


# --- In a real pipeline: steps, AdaRound's codes, statistics from the quantized model ------------------------------


# The tiny PNDM pipeline at 16 px (8x8 latents) with one activation group: these tests are about steps, weights and
# statistics, which K-means would only slow down.
SIZE = 16


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(the tiny PNDM pipeline's directory, a statistics run with the UNet inputs recorded)."""
    model = build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    config = DGQConfig(groups=1, steps=STEPS, height=SIZE, width=SIZE)
    return model, collect_unet_stats(pipe, config, PROMPTS, 4, progress=False, record_inputs=True)


def _quantized(model, calibration, weights=None, **settings):
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    config = DGQConfig(groups=1, steps=STEPS, height=SIZE, width=SIZE, **settings)
    calibration.quantize(pipe.unet, config, weights, progress=False)
    return pipe


def test_the_step_switches_from_one_sampler_call_to_the_next_during_a_real_generation(calibrated):
    pipe = _quantized(*calibrated)
    quantizer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.act
    seen = []
    quantizer.register_forward_pre_hook(lambda module, args: seen.append((module.step, module.params().scale)))
    pipe(
        PROMPTS[:1], num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    timesteps = calibrated[1].record.timesteps
    assert len(timesteps) == STEPS + 1 and len(set(timesteps)) == STEPS, "PNDM repeats its second timestep"
    assert [step for step, _ in seen] == list(range(len(timesteps)))
    for step, scale in seen:
        assert torch.equal(scale, quantizer.scale[step])
    assert not torch.equal(seen[1][1], seen[2][1]), "the repeated timestep's two calls have their own parameters"


def test_adaround_codes_are_the_checkpoints_codes_within_one_of_nearest(calibrated, tmp_path):
    model, calibration = calibrated
    settings = dict(w_bits=4, weight_rounding="adaround", recon_iters=10, recon_samples=16)
    config = DGQConfig(groups=1, steps=STEPS, height=SIZE, width=SIZE, **settings)
    weights, report = calibration.reconstruct(StableDiffusionPipeline.from_pretrained(model).unet, config, False)
    assert report.rows == 16 and report.units == len(report.loss_learned)
    pipe = _quantized(model, calibration, weights, **settings)
    nearest = _quantized(model, calibration, w_bits=4)
    dgq_core.save_pretrained(pipe, tmp_path / "ada", base_model=str(model))
    loaded = dgq_core.from_pretrained(tmp_path / "ada", exec_mode="fake")
    changed = 0
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "weight_q"):
            codes = module.weight_q.unpacked_codes().int()
            assert torch.equal(codes, weights[name].unpacked_codes().int())
            assert torch.equal(loaded.unet.get_submodule(name).weight_q.unpacked_codes().int(), codes)
            reference = nearest.unet.get_submodule(name).weight_q
            assert torch.equal(module.weight_q.scale, reference.scale)
            difference = (codes - reference.unpacked_codes().int()).abs()
            assert int(difference.max()) <= 1
            changed += int((difference > 0).sum())
    assert changed > 0


def test_statistics_from_the_quantized_model_include_the_upstream_error_only(calibrated):
    fp = _quantized(*calibrated, w_bits=4)
    quantized = _quantized(*calibrated, w_bits=4, calib_source="quantized")
    resnet_fp, resnet_q = fp.unet.down_blocks[0].resnets[0], quantized.unet.down_blocks[0].resnets[0]
    # "fp" takes the full-precision run's statistics as they are.
    fp_conv2 = calibrated[1].collector.per_step()["down_blocks.0.resnets.0.conv2"]
    from_fp = ActQuantizer.from_stats(fp_conv2, "conv", "group", 8, 1, None, (SIZE // 2, SIZE // 2))
    assert torch.equal(resnet_fp.conv2.act.scale, from_fp.scale)
    # conv1 sees conv_in's output through a norm: nothing quantized upstream, the same ranges.
    assert torch.equal(resnet_fp.conv1.act.scale, resnet_q.conv1.act.scale)
    # conv2 sees conv1's quantized weights and activations: other ranges.
    assert not torch.equal(resnet_fp.conv2.act.scale, resnet_q.conv2.act.scale)
    assert math.isclose(float(resnet_fp.conv2.act.scale.mean()), float(resnet_q.conv2.act.scale.mean()), rel_tol=0.5)
