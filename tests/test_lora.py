"""LoRA adapters (`dgq_core.lora`): the file layouts, the side branch beside quantized layers, per-row adapters in a
batch, the precomputed cross-attention keys and values, merging, and the library's cache."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from lora_files import ATTENTION_PROJECTIONS, random_lora_weights, write_lora

import dgq_core
from dgq_core import cli as dgq_cli
from dgq_core.attention import cross_attention_processors
from dgq_core.conditioning import PromptConditioner, conditioning, pack_prompt_pair, unpack_prompt_pair
from dgq_core.layers import QuantConv2d, QuantLinear
from dgq_core.lora import (
    LoRAError,
    LoRALibrary,
    UnknownLoRA,
    load_lora,
    merge_lora,
    resolve_targets,
    use_loras,
)
from dgq_eval import cli as eval_cli
from dgq_eval import harness
from dgq_eval.harness import EvalConfig

STEPS = 4
PROMPTS = ["a red square", "a blue circle on green", "small yellow triangle"]


@pytest.fixture(scope="module")
def fp_pipe(tiny_sd_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir)
    pipe.set_progress_bar_config(disable=True)
    dgq_core.make_batch_invariant(pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def dgq_pipe(tiny_dgq_checkpoint_dir):
    pipe = dgq_core.from_pretrained(tiny_dgq_checkpoint_dir)
    pipe.set_progress_bar_config(disable=True)
    dgq_core.make_batch_invariant(pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def lora_weights(fp_pipe):
    """Attention projections (cross-attention to_k/to_v among them), a ResNet conv and the 1x1 proj_in conv."""
    return random_lora_weights(fp_pipe.unet, (*ATTENTION_PROJECTIONS, "conv1", "proj_in"), rank=4)


@pytest.fixture(scope="module")
def lora(lora_weights, tmp_path_factory):
    return load_lora(write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", lora_weights))


def _images(pipe, rows, seeds, guidance=7.5, output_type="np"):
    """Images of (prompt, adapter set) rows through the service's path: encoded by `PromptConditioner` (with the
    rows' adapters), carried through the wire format, run under `conditioning`."""
    conditioner = PromptConditioner(pipe, cross_attention_processors(pipe.unet))
    loras = [adapters for _, adapters in rows]
    prompts = conditioner.encode([prompt for prompt, _ in rows], loras)
    negatives = conditioner.encode(["" for _ in rows], loras)
    pairs = [unpack_prompt_pair(pack_prompt_pair(p, n)) for p, n in zip(prompts, negatives, strict=True)]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with conditioning(pipe, [p for p, _ in pairs], [n for _, n in pairs], guidance, loras) as text_inputs:
        return pipe(**text_inputs, num_inference_steps=STEPS, guidance_scale=guidance, generator=generators,
                    output_type=output_type).images


def test_peft_kohya_and_attention_processor_layouts_load_alike(lora_weights, fp_pipe, tmp_path):
    peft = load_lora(write_lora(tmp_path / "peft.safetensors", lora_weights, "peft"))
    kohya = load_lora(write_lora(tmp_path / "kohya.safetensors", lora_weights, "kohya", alpha=2.0))
    attention_only = {name: w for name, w in lora_weights.items() if name.endswith(ATTENTION_PROJECTIONS)}
    procs = load_lora(write_lora(tmp_path / "procs.safetensors", attention_only, "attn-procs"))
    assert (peft.key_format, kohya.key_format, procs.key_format) == ("peft", "kohya", "attn-procs")
    assert peft.rank == kohya.rank == 4 and peft.name == "peft"
    modules = dict(fp_pipe.unet.named_modules())
    by_peft, by_kohya = resolve_targets(peft, modules), resolve_targets(kohya, modules)
    assert set(by_peft) == set(by_kohya) == set(lora_weights)
    for name, (module, layer) in by_peft.items():
        kohya_layer = by_kohya[name][1]
        # kohya's alpha 2 of rank 4 halves the update; with no alpha PEFT's is alpha = rank
        assert torch.allclose(layer.delta_weight(module.weight.shape), 2 * kohya_layer.delta_weight(module.weight.shape))
    assert set(resolve_targets(procs, modules)) == set(attention_only)


def test_side_branch_beside_a_quantized_layer_is_low_rank_in_full_precision(dgq_pipe, lora):
    unet = dgq_pipe.unet
    modules = dict(unet.named_modules())
    conv_name = next(name for name in lora.layers if isinstance(modules[name], QuantConv2d))
    linear_name = next(name for name in lora.layers if isinstance(modules[name], QuantLinear) and "attn1.to_q" in name)
    codes = {name: modules[name].weight_q.codes.clone() for name in (conv_name, linear_name)}
    conv, linear = modules[conv_name], modules[linear_name]
    torch.manual_seed(0)
    x_conv = torch.randn(3, conv.in_channels, 8, 8)
    x_linear = torch.randn(3, 64, linear.in_features)
    with torch.no_grad():
        plain = conv(x_conv), linear(x_linear)
        with use_loras({conv_name: conv, linear_name: linear}, [[(lora, 0.7)]] * 3, strict=False):
            adapted = conv(x_conv), linear(x_linear)
    down, up = lora.layers[conv_name].down, lora.layers[conv_name].up
    expected_conv = 0.7 * F.conv2d(F.conv2d(x_conv, down, padding=conv.padding), up)  # alpha = rank: scale 1
    down, up = lora.layers[linear_name].down, lora.layers[linear_name].up
    expected_linear = 0.7 * x_linear @ down.T @ up.T
    assert torch.allclose(adapted[0] - plain[0], expected_conv, atol=1e-4)
    assert torch.allclose(adapted[1] - plain[1], expected_linear, atol=1e-4)
    assert float(expected_linear.abs().mean()) > 1e-2, "the branch changes the output"
    assert all(torch.equal(modules[name].weight_q.codes, before) for name, before in codes.items())
    with torch.no_grad():
        assert torch.equal(linear(x_linear), plain[1]), "leaving the context removes the branch"


def test_each_row_gets_its_own_adapters_and_matches_its_image_alone(dgq_pipe, lora):
    """Compared as latents: the VAE decodes a batch at once here (the worker decodes image by image)."""
    rows = [(PROMPTS[0], [(lora, 1.0)]), (PROMPTS[1], []), (PROMPTS[2], [(lora, 0.5)]), (PROMPTS[0], [])]
    seeds = [1, 2, 3, 1]
    batched = _images(dgq_pipe, rows, seeds, output_type="latent")
    for index, (row, seed) in enumerate(zip(rows, seeds, strict=True)):
        alone = _images(dgq_pipe, [row], [seed], output_type="latent")
        assert torch.equal(alone[0], batched[index]), f"row {index} differs when batched"
    assert float((batched[0] - batched[3]).abs().mean()) > 1e-3, "the adapter changes the image"
    full = _images(dgq_pipe, [(PROMPTS[2], [(lora, 1.0)])], [3], output_type="latent")[0]
    assert not torch.equal(full, batched[2]), "the scale matters"


def test_precomputed_cross_attention_keys_and_values_carry_the_adapter_exactly(dgq_pipe, lora):
    """The API computes cross-attention K/V (to_k/to_v) once per prompt: with an adapter on them the precomputed
    ones must equal what the UNet computes itself with the adapter's branch."""
    assert any(name.endswith("attn2.to_k") for name in lora.layers)
    conditioner = PromptConditioner(dgq_pipe, cross_attention_processors(dgq_pipe.unet))
    [prompt], [negative] = conditioner.encode([PROMPTS[1]]), conditioner.encode([""])
    embeds = {"prompt_embeds": prompt.embeds[None], "negative_prompt_embeds": negative.embeds[None]}
    kwargs = {"num_inference_steps": STEPS, "output_type": "np"}
    with use_loras(dgq_pipe.unet, [[(lora, 0.8)]] * 2):
        direct = dgq_pipe(**embeds, generator=torch.Generator().manual_seed(4), **kwargs).images
    injected = _images(dgq_pipe, [(PROMPTS[1], [(lora, 0.8)])], [4])
    assert np.array_equal(direct, injected)
    kv_without_adapter = [(lora, 0.8)]
    [plain_kv] = conditioner.encode([PROMPTS[1]])
    [plain_negative] = conditioner.encode([""])
    with conditioning(dgq_pipe, [plain_kv], [plain_negative], 7.5, [kv_without_adapter]) as text_inputs:
        stale = dgq_pipe(**text_inputs, generator=torch.Generator().manual_seed(4), **kwargs).images
    assert not np.array_equal(stale, direct), "keys/values encoded without the adapter give another image"


def test_merged_adapter_matches_the_side_branch_on_a_full_precision_model(tiny_sd_model_dir, fp_pipe, lora):
    kwargs = {"num_inference_steps": STEPS, "output_type": "np"}
    with use_loras(fp_pipe.unet, [[(lora, 0.6)]] * 2):
        branch = fp_pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(5), **kwargs).images
    merged_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir)
    merged_pipe.set_progress_bar_config(disable=True)
    plain = merged_pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(5), **kwargs).images
    merge_lora(merged_pipe.unet, lora, 0.6)
    merged = merged_pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(5), **kwargs).images
    assert float(np.abs(merged - plain).mean()) > 1e-3
    assert np.allclose(merged, branch, atol=1e-4)


def test_merging_into_a_quantized_model_is_refused(dgq_pipe, lora):
    with pytest.raises(LoRAError, match="quantized"):
        merge_lora(dgq_pipe.unet, lora)


def test_pickle_files_and_foreign_adapters_are_refused(tmp_path, fp_pipe, lora_weights):
    for suffix in (".bin", ".pt", ".ckpt"):
        path = tmp_path / f"style{suffix}"
        path.write_bytes(b"not read")
        with pytest.raises(LoRAError, match="pickle"):
            load_lora(path)
    foreign = {name.replace("down_blocks", "input_blocks"): w for name, w in lora_weights.items()}
    with pytest.raises(LoRAError, match="another model"):
        resolve_targets(load_lora(write_lora(tmp_path / "foreign.safetensors", foreign)),
                        dict(fp_pipe.unet.named_modules()))
    name, (down, up) = next(iter(lora_weights.items()))
    wrong_rank_chain = {name: (down, up[:, :2])}
    with pytest.raises(LoRAError, match="does not chain"):
        load_lora(write_lora(tmp_path / "broken.safetensors", wrong_rank_chain))
    with pytest.raises(ValueError, match="rows"), use_loras(fp_pipe.unet, [[(load_lora(
            write_lora(tmp_path / "ok.safetensors", lora_weights)), 1.0)]] * 3):
        fp_pipe(PROMPTS[:1], num_inference_steps=1, output_type="np")


def test_library_lists_loads_once_and_keeps_a_byte_budget(tmp_path, fp_pipe):
    for seed, name in enumerate(("alpha", "beta")):
        write_lora(tmp_path / f"{name}.safetensors", random_lora_weights(fp_pipe.unet, rank=2 + 2 * seed, seed=seed))
    (tmp_path / "pickled.bin").write_bytes(b"never listed")
    (tmp_path / "alpha.json").write_text('{"trigger": "ink"}')
    sizes = {name: load_lora(tmp_path / f"{name}.safetensors").nbytes for name in ("alpha", "beta")}
    library = LoRALibrary(tmp_path, cache_bytes=max(sizes.values()))
    assert library.names() == ["alpha", "beta"]
    info = {entry.name: entry for entry in library.describe()}
    assert info["beta"].rank == 4 and info["alpha"].rank == 2
    assert info["alpha"].bytes == sizes["alpha"] and info["alpha"].description == {"trigger": "ink"}
    assert all(name.endswith(ATTENTION_PROJECTIONS) for name in info["alpha"].targets)
    first = library.get("alpha")
    assert library.get("alpha") is first, "loaded once"
    library.get("beta")
    assert library.cached() == ["beta"], "alpha and beta together exceed the budget: the older goes"
    assert library.get("alpha") is not first
    with pytest.raises(UnknownLoRA) as refused:
        library.get("gamma")
    assert "alpha, beta" in str(refused.value) and refused.value.available == ["alpha", "beta"]


def test_quantize_with_a_merged_adapter_quantizes_the_adapted_weights(tiny_sd_model_dir, lora, tmp_path):
    path = write_lora(tmp_path / "style.safetensors", {name: (layer.down, layer.up) for name, layer in lora.layers.items()})
    out = tmp_path / "merged-dgq"
    status = dgq_cli.main(["quantize", "--model", str(tiny_sd_model_dir), "--out", str(out), "--groups", "2",
                           "--steps", "2", "--num-calib", "2", "--batch-size", "2", "--lora", f"{path}:0.5"])
    assert status == 0
    quantized = dgq_core.from_pretrained(out, exec_mode="fake").unet  # integer executors hold the codes elsewhere
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir).unet
    name = next(name for name in lora.layers if name.endswith("attn1.to_q"))
    weight = base.get_submodule(name).weight.detach()
    merged = weight + 0.5 * lora.layers[name].delta_weight(weight.shape)
    codes = quantized.get_submodule(name).weight_q.dequantize()
    assert float((codes - merged).abs().max()) < 0.5 * float((codes - weight).abs().max())


def test_eval_side_branch_and_merge_agree_on_a_full_precision_model(tiny_sd_model_dir, lora_weights, tmp_path):
    path = write_lora(tmp_path / "style.safetensors", lora_weights)
    (tmp_path / "style.json").write_text('{"trigger": "ink"}')
    args = eval_cli.build_parser().parse_args(["--model", "m", "--lora", f"{path}:0.7", "--lora-merge"])
    assert args.loras == [(path, 0.7)] and args.lora_merge
    prompts = ["a red square", "a blue circle"]
    config = EvalConfig(model=str(tiny_sd_model_dir), prompts=prompts, num_inference_steps=2, batch_size=2,
                        loras=[(str(path), 0.7)], prompt_suffix=" ink")
    merged_config = replace(config, merge_loras=True)
    branch, _ = harness.generate(harness.load_model(tiny_sd_model_dir), config)
    merged, _ = harness.generate(harness.load_model(tiny_sd_model_dir, merged_loras=merged_config.loras), merged_config)
    plain, _ = harness.generate(harness.load_model(tiny_sd_model_dir), replace(config, loras=[]))
    assert np.abs(branch.astype(int) - merged.astype(int)).max() <= 1
    assert np.abs(branch.astype(int) - plain.astype(int)).mean() > 1


def test_a_truncated_adapter_is_a_lora_error_and_left_out_of_the_listing(tmp_path, lora_weights):
    good = write_lora(tmp_path / "good.safetensors", lora_weights)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:100])
    with pytest.raises(LoRAError, match="cut.safetensors cannot be read"):
        load_lora(tmp_path / "cut.safetensors")
    library = LoRALibrary(tmp_path, cache_bytes=1 << 20)
    assert library.names() == ["cut", "good"] and [info.name for info in library.describe()] == ["good"]
    with pytest.raises(LoRAError):
        library.get("cut")
