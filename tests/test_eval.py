"""Alignment scorer, feature network, metrics and the `dgq-eval` entry point on tiny models (CPU, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from dgq_core import load_prompt_file
from dgq_eval import alignment, cli, harness, metrics
from dgq_eval.features import ShapesFeatureNet, attribute_accuracy
from dgq_eval.real_models import PARTI_PROMPTS, inception_weights_path
from dgq_zoo import shapes
from dgq_zoo.model import (
    ZooModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)


def test_scorer_is_at_least_98_percent_accurate_on_real_images():
    images, scenes = shapes.make_batch(400, seed=123, split="all")
    summary = alignment.score_images(images, scenes)
    assert summary.accuracy >= 0.98 and summary.attribute_accuracy >= 0.98
    assert set(summary.per_attribute) == {"background", "color", "shape", "size", "relation"}


def test_scorer_rejects_images_of_other_prompts():
    images, scenes = shapes.make_batch(200, seed=7, split="all")
    wrong = 0
    for image, scene in zip(images, scenes, strict=True):
        first = scene.objects[0]
        other_shape = shapes.SHAPES[(shapes.SHAPES.index(first.shape) + 1) % len(shapes.SHAPES)]
        changed = replace(scene, objects=(replace(first, shape=other_shape),) + scene.objects[1:])
        wrong += not alignment.score_image(image, changed).correct
    assert wrong >= 0.98 * len(scenes)
    scene = shapes.parse_prompt("a red circle above a blue square on a yellow background")
    image = np.asarray(shapes.render_scene(scene, seed=1))
    assert alignment.score_image(image, scene).correct
    assert not alignment.score_image(image, replace(scene, relation="below")).checks["relation"]
    assert not alignment.score_image(image, replace(scene, background="green")).checks["background"]


def test_feature_net_recognises_real_images():
    accuracy = attribute_accuracy(ShapesFeatureNet.from_pretrained(), num=300)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_frechet_distance_psnr_ssim():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(400, 8))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, b) < 0.5
    assert metrics.frechet_distance(a, b + 3.0) == pytest.approx(8 * 9.0, rel=0.1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
    assert metrics.psnr(image, image) == float("inf")
    assert 35 < metrics.psnr(noisy, image) < 50
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    assert metrics.mean_psnr(image[None], image[None]) == 100.0


def _tiny_pipeline_dir(directory: Path) -> Path:
    """A random-init model of the bundled model's architecture, small enough to run in a second."""
    config = ZooModelConfig(
        vae_channels=(16, 16, 16), unet_channels=(32, 32), unet_attention_heads=2, text_hidden_size=32, text_layers=1,
        text_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory / "tokenizer_build", config)
    pipeline = assemble_pipeline(
        build_vae(config), build_text_encoder(tokenizer, config), tokenizer, build_unet(config)
    )
    pipeline.save_pretrained(directory / "model")
    return directory / "model"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_pipeline_dir(tmp_path_factory.mktemp("tiny"))


def test_eval_cli_writes_json_and_markdown(tiny_model, tmp_path):
    args = ["--model", str(tiny_model), "--num", "4", "--steps", "2", "--batch-size", "3", "--reference", str(tiny_model),
            "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"), "--save-images", str(tmp_path / "img")]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_images"] == 4 and report["seconds_per_image"] > 0
    assert 0.0 <= report["alignment"]["accuracy"] <= 1.0 and report["fid"] >= 0.0
    # Same model, same seeds: identical images, whatever the batch split.
    assert report["psnr_vs_reference"] == 100.0 and report["ssim_vs_reference"] == pytest.approx(1.0)
    assert "| alignment" in (tmp_path / "r.md").read_text()
    assert len(list((tmp_path / "img").glob("*.png"))) == 4
    # A directory of saved images serves as the reference too.
    assert (
        cli.main(args[:8] + ["--reference", str(tmp_path / "img"), "--json", str(tmp_path / "r2.json")]) == 0
    )
    assert json.loads((tmp_path / "r2.json").read_text())["psnr_vs_reference"] == 100.0


def _tiny_clip_dir(directory: Path, tokenizer_dir: Path) -> Path:
    config = CLIPConfig(
        text_config={"vocab_size": 200, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def test_eval_of_a_real_model_path_on_parti_prompts(tiny_model, tmp_path):
    prompts_file = PARTI_PROMPTS
    assert len(load_prompt_file(prompts_file)) == 1632
    clip_dir = _tiny_clip_dir(tmp_path / "clip", tiny_model / "tokenizer")
    args = ["--model", str(tiny_model), "--prompts", str(prompts_file), "--num", "3", "--steps", "2",
            "--clip-model", str(clip_dir), "--json", str(tmp_path / "r.json")]  # fmt: skip
    if inception_weights_path() is not None:
        args += ["--reference", str(tiny_model)]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["alignment"] is None and 0.0 <= report["clip_score"] <= 1.0
    if inception_weights_path() is not None:
        assert report["fid"] == pytest.approx(0.0, abs=1e-3)


def test_heldout_prompts_are_fixed_and_held_out():
    prompts = harness.heldout_prompts(16)
    assert prompts == harness.heldout_prompts(16)
    assert all(shapes.is_heldout(shapes.parse_prompt(p)) for p in prompts)


@pytest.mark.slow
def test_quality_benchmark_smoke(tiny_model, tmp_path):
    """The BENCHMARKS quality table's code path, on a few prompts: FP, DGQ and the per-tensor baseline at W8A8."""
    from dgq_eval import benchmark
    from dgq_zoo.train import write_calibration_prompts

    write_calibration_prompts(tiny_model)
    settings = [benchmark.QuantSetting("dgq", 8, 8, 8), benchmark.QuantSetting("pertensor", 8, 8)]
    reports = benchmark.run(tmp_path, tiny_model, num=3, steps=3, guidance=5.0, num_calib=2, settings=settings)
    assert [label for label, _ in reports] == ["FP32", "W8A8 dgq K=8", "W8A8 pertensor"]
    assert all(r.psnr_vs_reference is not None and r.alignment is not None for _, r in reports[1:])
    table = json.loads((tmp_path / "quality.json").read_text())
    assert len(table["rows"]) == 3 and "W8A8 dgq K=8" in (tmp_path / "quality.md").read_text()


def test_quality_table_rows_have_distinct_method_names_and_labels():
    """--methods picks rows by key and the table names them by label: every default row must have its own of both."""
    from dgq_eval import benchmark

    settings = benchmark.default_settings([(8, 8)])
    keys, labels = [s.key for s in settings], [s.label for s in settings]
    assert len(set(keys)) == len(keys) and len(set(labels)) == len(labels)
    assert {"dgq8", "dgq16", "dgq8-shared", "dgq8-uniform", "dgq8-sqrt2", "dgq16-sqrt2", "pertensor", "dynamic"} == set(keys)
    assert "W8A8 dgq K=8 log-sqrt2 probs" in labels
    # Keys parse back into their rows; the older one-token spelling (dgq8sqrt2) names the same row.
    assert all(benchmark.QuantSetting.parse(s.key, 8, 8) == s for s in settings)
    assert benchmark.QuantSetting.parse("dgq8sqrt2", 8, 8) == benchmark.QuantSetting.parse("dgq8-sqrt2", 8, 8)
    ablation = benchmark.QuantSetting.parse("dgq8-uniform-static-nosplit-ada", 4, 6)
    assert (ablation.prob_quantizer, ablation.prob_scale, ablation.start_split, ablation.weight_rounding) == (
        "uniform", "static", False, "adaround"
    )
    assert ablation.label == "W4A6 dgq K=8 uniform probs static scale no start split AdaRound"
    with pytest.raises(ValueError, match="unknown variant"):
        benchmark.QuantSetting.parse("dgq8-fast", 8, 8)
