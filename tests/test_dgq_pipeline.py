"""DGQ on a tiny random-init SD-architecture pipeline: structure, per-step parameters, batch independence,
prompt-specific attention parameters, and checkpoint round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_sd

import dgq_core
from dgq_core.attention import DGQAttnProcessor, cross_attention_processors, quantize_probs_per_sample
from dgq_core.calibration import collect_unet_stats
from dgq_core.checkpoint import DIGEST_KEY, FORMAT, FORMAT_KEY, WEIGHTS_NAME, CheckpointError
from dgq_core.conditioning import (
    PromptConditioner,
    conditioning,
    pack_prompt_pair,
    text_conditioning,
    unpack_prompt_pair,
    use_prompt_params,
)
from dgq_core.config import DGQConfig
from dgq_core.diffusers_quantizer import load_quantized_unet, quantization_config_of
from dgq_core.layers import QuantConv2d, QuantLinear
from dgq_core.steps import calibrated_step_for

PROMPTS = ["a red circle", "a blue square on green", "small yellow triangle", "big purple star"]
STEPS = 4


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


def generate(pipe, prompts, seeds, **kwargs):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(prompts, num_inference_steps=STEPS, generator=generators, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def quantized(tiny_sd, tmp_path_factory):
    """(pipeline with a DGQ W8A8 K=4 UNet, its config, the saved directory)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    config = DGQConfig(method="dgq", w_bits=8, a_bits=8, groups=4, steps=STEPS)
    dgq_core.quantize_(pipe, config, PROMPTS, batch_size=2, progress=False)
    out = tmp_path_factory.mktemp("quantized") / "dgq"
    dgq_core.save_pretrained(pipe, out, base_model=str(tiny_sd))
    return pipe, quantization_config_of(pipe.unet), out


def test_quantized_modules_follow_the_method(quantized):
    pipe, config, _ = quantized
    unet = pipe.unet
    assert type(unet.conv_in) is torch.nn.Conv2d and type(unet.conv_out) is torch.nn.Conv2d
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, QuantConv2d)
    assert unet.time_embedding.linear_1.act.mode == "tensor"
    assert unet.down_blocks[0].resnets[0].time_emb_proj.act.mode == "tensor"
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block.ff.net[2], QuantLinear) and block.ff.net[2].act.mode == "group"
    assert isinstance(block.attn1.processor, DGQAttnProcessor) and not block.attn1.processor.keep_start
    assert block.attn2.processor.keep_start
    # Cross-attention keys/values depend only on the prompt: one parameter set for all steps.
    assert block.attn2.to_k.act.scale.shape[0] == 1 and block.attn2.processor.k_quant.scale.shape[0] == 1
    per_step = block.attn1.to_q.act
    assert per_step.scale.shape == (config.record.unet_calls, config.groups)
    assert int(unet.down_blocks[0].resnets[0].conv1.weight_q.codes.max()) <= 255


def test_statistics_collected_once_quantize_every_bit_width_like_a_full_calibration(tiny_sd, quantized):
    pipe, config, _ = quantized
    stats_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    calibration = collect_unet_stats(stats_pipe, DGQConfig(method="dgq", steps=STEPS), PROMPTS, 2, progress=False)
    assert calibration.collected_like(DGQConfig(method="dgq", w_bits=4, a_bits=6, groups=16, steps=STEPS))
    assert not calibration.collected_like(DGQConfig(method="pertensor", steps=STEPS))
    settings = DGQConfig(method="dgq", w_bits=8, a_bits=8, groups=4, steps=STEPS)
    quantized_config = calibration.quantize(stats_pipe.unet, settings)
    assert settings.calibration is None, "the user's settings are not written to"
    assert quantized_config.calibration == config.calibration, "the record comes from the statistics run"
    reference = pipe.unet.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in stats_pipe.unet.state_dict().items())
    with pytest.raises(ValueError, match="cannot quantize pertensor"):
        calibration.quantize(StableDiffusionPipeline.from_pretrained(tiny_sd).unet, DGQConfig(method="pertensor"))


def test_steps_are_keyed_by_call_index_including_pndms_repeated_timestep(quantized):
    _, config, _ = quantized
    timesteps = config.record.timesteps
    assert len(timesteps) == STEPS + 1 and len(set(timesteps)) == STEPS  # PNDM repeats its second timestep
    seen: dict[int, int] = {}
    for call, t in enumerate(timesteps):
        assert calibrated_step_for(t, seen.get(t, 0), timesteps) == call
        seen[t] = seen.get(t, 0) + 1


def test_quantized_image_is_close_to_but_not_equal_to_full_precision(tiny_sd, quantized):
    pipe, _, _ = quantized
    fp = StableDiffusionPipeline.from_pretrained(tiny_sd)
    fp.set_progress_bar_config(disable=True)
    reference = generate(fp, PROMPTS[:1], [0])
    image = generate(pipe, PROMPTS[:1], [0])
    mse = float(((image - reference) ** 2).mean())
    assert 0 < mse < 1e-2


def test_an_image_does_not_depend_on_its_batch(quantized):
    pipe, _, _ = quantized
    alone = generate(pipe, PROMPTS[:1], [7])
    batched = generate(pipe, [PROMPTS[2], PROMPTS[0], PROMPTS[3]], [3, 7, 11])
    assert np.abs(alone[0] - batched[1]).max() <= 1e-5


@pytest.mark.parametrize("quantizer", ["log2", "log-sqrt2", "uniform"])
def test_start_column_passes_unchanged_and_the_scale_is_per_sample(quantizer):
    probs = torch.softmax(torch.randn(2, 2, 5, 9) * 3, dim=-1)
    probs[1] = torch.softmax(torch.randn(2, 5, 9) * 8, dim=-1)
    out = quantize_probs_per_sample(probs.clone(), 6, keep_start=True, quantizer=quantizer)
    assert torch.equal(out[..., 0], probs[..., 0])
    assert not torch.equal(out[..., 1:], probs[..., 1:])
    alone = quantize_probs_per_sample(probs[:1].clone(), 6, keep_start=True, quantizer=quantizer)
    assert torch.equal(alone[0], out[0])


def test_log2_codes_are_powers_of_two_of_the_scale_and_uniform_codes_its_steps():
    probs = torch.softmax(torch.randn(1, 2, 4, 16) * 4, dim=-1)
    scale = probs.max()
    log2 = quantize_probs_per_sample(probs.clone(), 8, keep_start=False, quantizer="log2")
    exponents = torch.log2(log2 / scale)
    assert torch.allclose(exponents, exponents.round(), atol=1e-5)
    uniform = quantize_probs_per_sample(probs.clone(), 8, keep_start=False, quantizer="uniform")
    steps = uniform / (scale / 255)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert (uniform - probs).abs().max() <= scale / 255 / 2 + 1e-7


def test_log_sqrt2_codes_are_half_octaves_of_the_scale_and_halve_the_log2_error():
    probs = torch.softmax(torch.randn(1, 2, 8, 16) * 4, dim=-1)
    scale = probs.max()
    fine = quantize_probs_per_sample(probs.clone(), 8, keep_start=False, quantizer="log-sqrt2")
    half_octaves = -2 * torch.log2(fine / scale)
    assert torch.allclose(half_octaves, half_octaves.round(), atol=1e-4)
    assert bool((half_octaves.round() % 2 == 1).any()), "odd codes (the half steps) are used"
    coarse = quantize_probs_per_sample(probs.clone(), 8, keep_start=False, quantizer="log2")
    # Rounding in the log domain: within 2^(1/4) of the value vs within 2^(1/2) for log2 codes.
    assert float((fine / probs).log2().abs().max()) <= 0.25 + 1e-5
    assert float((coarse / probs).log2().abs().max()) > 0.25
    assert float((fine - probs).abs().mean()) < float((coarse - probs).abs().mean())


def test_precomputed_prompt_params_reproduce_the_image_exactly(quantized):
    pipe, _, _ = quantized
    conditioner = PromptConditioner(pipe, cross_attention_processors(pipe.unet))
    prompts, negatives = conditioner.encode(PROMPTS[:2]), conditioner.encode(["", ""])
    assert all(any(name.endswith("key.codes") for name in p.params) for p in prompts)
    # Through the wire format, as between the API and a worker.
    pairs = [unpack_prompt_pair(pack_prompt_pair(p, n)) for p, n in zip(prompts, negatives, strict=True)]
    prompts, negatives = [p for p, _ in pairs], [n for _, n in pairs]
    generators = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    embeds = torch.stack([p.embeds for p in prompts])
    negative = torch.stack([n.embeds for n in negatives])
    kwargs = dict(num_inference_steps=STEPS, output_type="np")
    direct = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generators(), **kwargs).images
    with conditioning(pipe, prompts, negatives, guidance_scale=7.5) as text_inputs:
        injected = pipe(**text_inputs, generator=generators(), **kwargs).images
    assert np.array_equal(direct, injected)
    one_row = [negatives[0].params]
    with use_prompt_params(pipe.unet, one_row), pytest.raises(ValueError, match="samples"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generators(), **kwargs)



def test_text_conditioning_computes_cross_attention_keys_once_per_call(quantized):
    """`dgq generate` and the eval harness encode prompts the service's way: a cross-attention's keys are computed
    once per text-encoder call (the prompts', the negative prompts'), not at every step, and the image is the
    pipeline's own."""
    pipe, _, _ = quantized
    attn, _ = next(iter(cross_attention_processors(pipe.unet).values()))
    calls, unet_calls = [], []
    hooks = [attn.to_k.register_forward_hook(lambda *_: calls.append(1)),
             pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))]  # fmt: skip
    try:
        direct = generate(pipe, PROMPTS[:2], [1, 2])
        per_step = len(calls)
        calls.clear()
        with text_conditioning(pipe, PROMPTS[:2], None, 7.5) as text_inputs:
            conditioned = generate(pipe, None, [1, 2], **text_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert per_step == len(unet_calls) // 2 >= STEPS and len(calls) == 2
    assert np.array_equal(direct, conditioned)

def test_save_load_generate_gives_the_same_image(quantized):
    pipe, _, out = quantized
    before = generate(pipe, PROMPTS[1:2], [5])
    # The quantized pipeline runs the fake-quant reference; "auto" may run integers, whose float sums differ.
    loaded = dgq_core.from_pretrained(out, exec_mode="fake")
    after = generate(loaded, PROMPTS[1:2], [5])
    assert np.array_equal(before, after)
    saved = json.loads((out / "unet" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "dgq" and saved["groups"] == 4 and saved["excluded_layers"] == ["conv_in", "conv_out"]
    assert saved["calibration"]["timesteps"] == quantization_config_of(pipe.unet).record.timesteps
    assert not any(p.dtype.is_floating_point and p.numel() > 10_000 for p in loaded.unet.state_dict().values())


def test_half_precision_components_around_the_fp32_dgq_unet(quantized):
    """What `from_pretrained` gives on CUDA (`component_dtype`), here on the CPU: text encoder and VAE in BF16, the
    DGQ UNet in FP32 with its inputs and output cast at its boundary; the image stays close to the FP32
    pipeline's, and the precomputed prompt parameters (from BF16 embeddings) reproduce the UNet's own."""
    _, _, out = quantized
    reference = generate(dgq_core.from_pretrained(out), PROMPTS[:1], [3])
    pipe = dgq_core.from_pretrained(out, dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
    assert pipe.unet.dtype == torch.float32
    image = generate(pipe, PROMPTS[:1], [3])
    assert image.dtype == np.float32 and np.isfinite(image).all()
    assert 0 < float(np.abs(image - reference).mean()) < 0.02
    conditioner = PromptConditioner(pipe, cross_attention_processors(pipe.unet))
    [prompt], [negative] = conditioner.encode(PROMPTS[:1]), conditioner.encode([""])
    with conditioning(pipe, [prompt], [negative], 7.5) as text_inputs:
        injected = generate(pipe, None, [3], **text_inputs)
    direct = generate(pipe, None, [3], prompt_embeds=prompt.embeds[None], negative_prompt_embeds=negative.embeds[None])
    assert np.array_equal(injected, direct)


def test_diffusers_from_pretrained_loads_a_dgq_checkpoint_like_dgq_core(quantized):
    _, _, out = quantized
    ours = generate(dgq_core.from_pretrained(out, exec_mode="fake"), PROMPTS[:2], [3, 4])
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet.hf_quantizer, dgq_core.DGQQuantizer)
    assert np.array_equal(generate(pipe, PROMPTS[:2], [3, 4]), ours)
    # diffusers' own save writes the same checkpoint back.
    pipe.save_pretrained(out.parent / "resaved")
    resaved = generate(dgq_core.from_pretrained(out.parent / "resaved", exec_mode="fake"), PROMPTS[:2], [3, 4])
    assert np.array_equal(resaved, ours)


def test_load_keeps_weights_as_integer_codes(quantized):
    _, _, out = quantized
    unet = load_quantized_unet(out / "unet")
    layer = unet.down_blocks[0].resnets[0].conv1
    assert layer.weight_q.codes.dtype == torch.uint8 and not hasattr(layer, "weight")


def test_corrupt_or_altered_checkpoints_are_refused(quantized, tmp_path):
    import shutil

    _, _, out = quantized
    broken = tmp_path / "unet"
    shutil.copytree(out / "unet", broken)
    weights = broken / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"does not match the {DIGEST_KEY}"):
        load_quantized_unet(broken)
    tensors = load_file(weights)
    save_file(tensors, weights, metadata={FORMAT_KEY: FORMAT})
    with pytest.raises(CheckpointError, match=f"names no {DIGEST_KEY}"):
        load_quantized_unet(broken)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized_unet(broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dgq"):
        load_quantized_unet(broken)


@pytest.mark.parametrize(("method", "w_bits", "a_bits"), [("pertensor", 4, 6), ("dynamic", 8, 8), ("dgq", 4, 6)])
def test_every_method_and_bit_setting_generates(tiny_sd, method, w_bits, a_bits):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    config = DGQConfig(method=method, w_bits=w_bits, a_bits=a_bits, groups=8, steps=2)
    dgq_core.quantize_(pipe, config, PROMPTS[:2], progress=False)
    image = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(image).all() and image.std() > 0
    codes = pipe.unet.down_blocks[0].resnets[0].conv1.weight_q.codes
    assert codes.shape[1] == (32 * 9 + 1) // 2 if w_bits == 4 else 32 * 9


def test_attention_in_blocks_of_query_rows_gives_the_same_images_within_the_budget(quantized):
    """Blocks of query rows (whose scores fit the budget) give the unblocked images bit for bit: softmax is row-local
    and the per-sample scale of Eq. 8 comes from a first pass over all blocks."""
    from dgq_core import attention

    pipe, _, _ = quantized
    whole = generate(pipe, PROMPTS[:2], [3, 4], height=64, width=64)
    # Self-attention at 64 px: 4 rows (CFG) x 8 heads x 1024 queries x 1024 keys, 128 MiB of float32 scores; a block
    # of the smallest height (64 query rows) takes 8 MiB.
    budget = 8 << 20
    assert attention.query_block_rows(4 * 8, 1024, 1024, budget) == 64, "the 64 px call runs in 16 blocks"
    dgq_core.set_attention_budget(pipe.unet, budget)
    try:
        attention._scratch.scores = None
        blocked = generate(pipe, PROMPTS[:2], [3, 4], height=64, width=64)
        assert attention._scratch.scores.numel() * 4 <= budget, "no scores block beyond the budget"
    finally:
        dgq_core.set_attention_budget(pipe.unet, attention.DEFAULT_SCORES_BUDGET_BYTES)
    assert np.array_equal(whole, blocked)
