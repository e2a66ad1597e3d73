"""The shapes dataset, the tokenizer, the trainer and the bundled model (real objects, CPU, a few seconds each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from dgq_zoo import bundled_model_dir, shapes
from dgq_zoo import train as zoo_train
from dgq_zoo.export import export
from dgq_zoo.tokenizer import save_word_tokenizer


def test_batches_are_a_function_of_the_seed():
    images_a, scenes_a = shapes.make_batch(16, seed=3)
    images_b, scenes_b = shapes.make_batch(16, seed=3)
    images_c, _ = shapes.make_batch(16, seed=4)
    assert images_a.shape == (16, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b) and scenes_a == scenes_b
    assert not np.array_equal(images_a, images_c)


def test_heldout_compositions_never_appear_in_training():
    train = shapes.sample_scenes(4000, seed=0, split="train")
    heldout = shapes.sample_scenes(500, seed=0, split="heldout")
    assert not any(shapes.is_heldout(scene) for scene in train)
    assert all(shapes.is_heldout(scene) for scene in heldout)
    assert {len(s.objects) for s in heldout} == {1, 2}
    fraction = np.mean([shapes.is_heldout(scene) for scene in shapes.all_scenes()])
    assert 0.08 < fraction < 0.12


def test_prompts_parse_back_to_their_scenes():
    for scene in shapes.all_scenes()[::7]:
        assert shapes.parse_prompt(scene.prompt) == scene
        assert shapes.Scene.from_dict(scene.to_dict()) == scene
    assert shapes.parse_prompt("a red circle above a blue square on a yellow background").relation == "above"
    for bad in (
        "a red circle",
        "a red red circle on a red background",
        "a huge red circle on a blue background",
    ):
        with pytest.raises(ValueError):
            shapes.parse_prompt(bad)


def test_objects_keep_their_relation_and_colours():
    scene = shapes.parse_prompt("a red circle to the left of a blue square on a yellow background")
    image = np.asarray(shapes.render_scene(scene, seed=5))
    red_cols = np.nonzero((image == shapes.PALETTE["red"]).all(-1))[1]
    blue_cols = np.nonzero((image == shapes.PALETTE["blue"]).all(-1))[1]
    assert red_cols.mean() < blue_cols.mean()
    assert (image[0, 0] == shapes.PALETTE["yellow"]).all()


@pytest.fixture(scope="module")
def bundled_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(bundled_model_dir() / "tokenizer")


def _assert_whole_word_tokens(tokenizer: CLIPTokenizer, prompts: list[str]) -> None:
    encoded = tokenizer(prompts).input_ids
    for prompt, ids in zip(prompts, encoded, strict=True):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokens == [tokenizer.bos_token] + [w + "</w>" for w in prompt.split()] + [
            tokenizer.eos_token
        ], prompt


def test_bundled_tokenizer_round_trips_every_prompt_to_whole_words(bundled_tokenizer):
    assert (bundled_model_dir() / "tokenizer" / "vocab.json").is_file()
    assert (bundled_model_dir() / "tokenizer" / "merges.txt").is_file()
    prompts = [scene.prompt for scene in shapes.all_scenes()]
    _assert_whole_word_tokens(bundled_tokenizer, prompts)
    longest = max(len(ids) for ids in bundled_tokenizer(prompts).input_ids)
    assert longest <= bundled_tokenizer.model_max_length
    # Text outside the vocabulary still tokenizes (into characters) instead of failing.
    assert len(bundled_tokenizer("a zebra").input_ids) > 3


def test_tokenizer_files_alone_reload(tmp_path):
    save_word_tokenizer(shapes.vocabulary(), tmp_path, model_max_length=20)
    (tmp_path / "tokenizer.json").unlink()  # the standard vocab.json + merges.txt must suffice
    _assert_whole_word_tokens(
        CLIPTokenizer.from_pretrained(tmp_path), [s.prompt for s in shapes.all_scenes()[::50]]
    )


def test_bundled_model_has_the_stable_diffusion_structure():
    unet = UNet2DConditionModel.from_pretrained(bundled_model_dir(), subfolder="unet")
    names = [name for name, _ in unet.named_modules()]
    assert any(name.endswith("attn2") for name in names) and any(name.endswith("attn1") for name in names)
    assert any("resnets" in name for name in names) and hasattr(unet, "time_embedding")
    assert hasattr(unet, "conv_in") and hasattr(unet, "conv_out")
    size = sum(p.stat().st_size for p in bundled_model_dir().rglob("*") if p.is_file())
    assert size <= 30 * 2**20


def test_bundled_model_loads_and_generates():
    pipeline = StableDiffusionPipeline.from_pretrained(bundled_model_dir())
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a large red circle on a blue background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_training_resumes_and_exports(tmp_path):
    common = ["--out", str(tmp_path / "run"), "--seed", "1", "--vae-steps", "2", "--latent-pool-size", "64",
              "--batch-size", "4", "--checkpoint-every", "1", "--export-every", "2", "--sample-every", "100"]  # fmt: skip
    assert zoo_train.main(common + ["--steps", "2"]) == 0
    assert zoo_train.main(common + ["--steps", "3", "--resume"]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["unet_step"] == 3 and state["vae_step"] == 2
    exported = tmp_path / "run" / "pipeline"
    assert json.loads((exported / "zoo_training.json").read_text())["unet_steps"] == 3
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    StableDiffusionPipeline.from_pretrained(exported)


def test_fresh_unet_keeps_the_pipelines_vae_and_text_encoder(tmp_path):
    args = ["--out", str(tmp_path / "run"), "--seed", "1", "--latent-pool-size", "64", "--batch-size", "4",
            "--steps", "1", "--init-from", str(bundled_model_dir()), "--fresh-unet", "--unet-channels", "32,64,64",
            "--export-every", "1", "--sample-every", "100"]  # fmt: skip
    assert zoo_train.main(args) == 0
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    bundled = StableDiffusionPipeline.from_pretrained(bundled_model_dir())
    assert list(exported.unet.config.block_out_channels) == [32, 64, 64]
    assert json.loads((tmp_path / "run" / "pipeline" / "zoo_training.json").read_text())["unet_steps"] == 1
    for name in ("vae", "text_encoder"):
        # The VAE is not trained in the UNet stage; the text encoder took one step (EMA: barely moved).
        ours, theirs = getattr(exported, name).state_dict(), getattr(bundled, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-3) for k in ours), name
    with pytest.raises(SystemExit, match="--init-from"):
        zoo_train.main(args[:10] + ["--fresh-unet"])
    with pytest.raises(SystemExit, match="--unet-channels"):
        zoo_train.main(args[:10] + ["--resume", "--unet-channels", "32,64"])
    # The checkpoint records its architecture: exporting it rebuilds its own UNet, not ZooModelConfig's default.
    export(tmp_path / "run", tmp_path / "exported")
    reexported = UNet2DConditionModel.from_pretrained(tmp_path / "exported", subfolder="unet")
    assert list(reexported.config.block_out_channels) == [32, 64, 64]


def test_relation_loss_reads_the_second_object_of_pair_prompts(tmp_path):
    trainer = zoo_train.Trainer(tmp_path, zoo_train.ZooModelConfig(), zoo_train.TrainConfig(relation_loss_weight=0.1))
    scenes = [shapes.parse_prompt(p) for p in (
        "a red circle above a blue square on a yellow background",
        "a small red circle on a gray background",
        "a green cross to the right of a white triangle on a black background",
    )]  # fmt: skip
    input_ids = trainer._tokenize([scene.prompt for scene in scenes])
    pairs, colours, relations = trainer.second_objects(input_ids)
    assert pairs.tolist() == [True, False, True]
    words = {index: word.removesuffix("</w>") for word, index in trainer.tokenizer.get_vocab().items()}
    paired = [scene for scene in scenes if scene.relation]
    for row, colour, relation, scene in zip(input_ids[pairs], colours, relations, paired, strict=True):
        second = scene.objects[1]
        assert [words[int(row[colour])], words[int(row[colour + 1])]] == [second.color, second.shape]
        assert list(shapes.RELATIONS)[relation] == scene.relation
    hidden = trainer.text_encoder(input_ids).last_hidden_state
    assert trainer.relation_loss(input_ids, hidden) > 0
    assert trainer.relation_loss(input_ids[1:2], hidden[1:2]) == 0, "single objects have no relation to read"


def test_mirrored_pairs_swap_the_words_and_the_objects_places():
    scene = shapes.parse_prompt("a red circle above a blue square on a yellow background")
    mirror = shapes.mirrored(scene)
    assert mirror.prompt == "a blue square above a red circle on a yellow background"
    original, swapped = np.asarray(shapes.render_scene(scene, 7)), np.asarray(shapes.render_scene(mirror, 7))
    def centre(image: np.ndarray, colour: str) -> np.ndarray:
        return np.argwhere((image == shapes.PALETTE[colour]).all(-1)).mean(axis=0)

    # Circle and square are centred in their boxes: each object's centre is where the other one was.
    assert np.allclose(centre(original, "red"), centre(swapped, "blue"))
    assert np.allclose(centre(original, "blue"), centre(swapped, "red"))
    assert shapes.mirrored(shapes.parse_prompt("a small red circle on a gray background")) is None


def test_mirror_couples_put_pairs_beside_their_mirrors(tmp_path):
    config = zoo_train.TrainConfig(batch_size=8, latent_pool_size=64, mirror_fraction=0.5, vae_steps=0)
    trainer = zoo_train.Trainer(tmp_path, zoo_train.ZooModelConfig(), config)
    trainer.build_latent_pool()
    _, _, input_ids = trainer._batch_entries(torch.Generator().manual_seed(3))
    words = {index: word.removesuffix("</w>") for word, index in trainer.tokenizer.get_vocab().items()}
    special = {trainer.tokenizer.pad_token_id, trainer.tokenizer.eos_token_id, trainer.tokenizer.bos_token_id}
    prompts = [" ".join(words[int(t)] for t in row if int(t) not in special) for row in input_ids]
    # 8 images, half of them in couples: 2 pairs (first), 4 drawn at random, the 2 mirrors (last).
    for first, mirror in zip(prompts[:2], prompts[-2:], strict=True):
        assert mirror == shapes.mirrored(shapes.parse_prompt(first)).prompt
        assert not shapes.is_heldout(shapes.parse_prompt(mirror))


def test_bundled_model_alignment_on_heldout_prompts():
    """Full-precision alignment on 8 held-out prompts at the evaluation's settings, against the number measured on
    64 prompts when the weights were exported (eval_heldout.json in the model directory)."""
    from dgq_eval import alignment, harness

    measured = json.loads((bundled_model_dir() / "eval_heldout.json").read_text())
    prompts = harness.heldout_prompts(8)
    config = harness.EvalConfig(model=str(bundled_model_dir()), prompts=prompts)
    images, _ = harness.generate(harness.load_model(bundled_model_dir()), config)
    accuracy = alignment.score_images(images, [shapes.parse_prompt(p) for p in prompts]).accuracy
    # 8 fixed prompts and seeds: a reproducible sample of the 64-prompt measurement, within its sampling error.
    assert accuracy >= measured["alignment"]["accuracy"] - 0.35
    if measured["alignment"]["accuracy"] < 0.9:
        pytest.xfail(f"the committed weights are short of the 90% bar: {measured['alignment']['accuracy']:.0%} (MODEL_CARD.md)")
