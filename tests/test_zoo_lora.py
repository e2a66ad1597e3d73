"""The example LoRA's trainer (`dgq-train-zoo --lora`) and its style: outlined shapes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

import dgq_core
from dgq_eval import harness, style
from dgq_zoo import bundled_lora_dir, bundled_model_dir, lora_train, shapes


def test_outlined_rendering_rings_each_shape_in_a_colour_of_neither_shape_nor_background():
    scene = shapes.parse_prompt("a large black square on a white background")
    plain = np.asarray(shapes.render_scene(scene, 7))
    outlined = np.asarray(shapes.render_scene(scene, 7, outlined=True))
    shape_mask = (plain == shapes.PALETTE["black"]).all(axis=-1)
    ring = shapes.outline_ring(shape_mask)
    assert shapes.outline_color(scene.objects[0], scene.background) == "gray"
    assert (outlined[ring] == shapes.PALETTE["gray"]).all() and ring.sum() > 4 * 15
    assert np.array_equal(outlined[~ring], plain[~ring]), "only the ring changes"


def test_lora_training_writes_a_peft_adapter_the_library_reads(tmp_path):
    config = lora_train.LoRATrainConfig(steps=2, batch_size=2, pool_scenes=8)
    path = lora_train.train_lora(bundled_model_dir(), tmp_path, config, name="tiny", threads=1)
    lora = dgq_core.load_lora(path)
    assert lora.key_format == "peft" and lora.rank == config.rank
    assert lora.layers and all(layer.alpha == config.alpha for layer in lora.layers.values())
    assert any(name.endswith("attn2.to_k") for name in lora.layers)
    assert any(float(layer.up.abs().max()) > 0 for layer in lora.layers.values()), "B moved off its zero init"
    description = json.loads(path.with_suffix(".json").read_text())
    assert description["trigger"] == lora_train.TRIGGER and description["training"]["steps"] == 2
    assert lora.description == description


def test_the_shipped_example_lora_outlines_shapes_as_a_side_branch_on_the_dgq_checkpoint():
    """The example adapter (dgq_zoo/loras/outlined) on the shipped DGQ checkpoint, as the service runs it: with the
    trigger, the outline colour covers several times more of the images than without the adapter."""
    lora_path = bundled_lora_dir() / f"{lora_train.LORA_NAME}.safetensors"
    prompts = harness.heldout_prompts(8)
    config = harness.EvalConfig(model=str(bundled_model_dir().with_name("dgq-shapes-dgq")), prompts=prompts,
                                batch_size=8, loras=[(str(lora_path), 1.0)], prompt_suffix=f" {lora_train.TRIGGER}")
    pipeline = harness.load_model(config.model)
    outlined, _ = harness.generate(pipeline, config)
    plain, _ = harness.generate(pipeline, replace(config, loras=[]))
    scenes = [shapes.parse_prompt(prompt) for prompt in prompts]
    with_adapter, without = style.mean_outline_fraction(outlined, scenes), style.mean_outline_fraction(plain, scenes)
    assert with_adapter > 3 * without and with_adapter > 0.005, (with_adapter, without)
