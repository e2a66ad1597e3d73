"""DGQ activation groups vs the per-tensor baseline on a real pretrained conv network: the TAESD decoder.

PSNR is measured against the full-precision decode of real photographs (scikit-image's bundled images); the
weights are the real TAESD ones the project ships (service/assets/taesd).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dgq_core.calibration import collect_module_stats, quantize_from_stats
from dgq_core.config import DGQConfig
from service.previews import load_taesd

# Fourteen bundled photographs, each also flipped and transposed: group ranges are fitted tightly to the
# calibration data, so it must cover the variety the evaluation images bring.
CALIBRATION_IMAGES = (
    "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina",
)
EVALUATION_IMAGES = ("astronaut", "rocket")
SIZE = 128


def photo(name: str) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1)[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


@pytest.fixture(scope="module")
def calibrated():
    """Decoder, its full-precision decodes of the evaluation photos, and statistics over the calibration photos."""
    model = load_taesd()
    with torch.no_grad():
        calibration = torch.cat(
            [torch.cat([z, z.flip(-1), z.flip(-2), z.transpose(-1, -2)]) for z in map(model.encoder, map(photo, CALIBRATION_IMAGES))]
        )
        evaluation = {name: model.encoder(photo(name)) for name in EVALUATION_IMAGES}
        reference = {name: model.decoder(z) for name, z in evaluation.items()}
    decoder = model.decoder
    config = DGQConfig(excluded_layers=[])
    collector, state = collect_module_stats(
        decoder, config, lambda: [decoder(calibration[i : i + 8]) for i in range(0, len(calibration), 8)], (SIZE // 8, SIZE // 8)
    )
    return decoder, evaluation, reference, collector, state


def decoder_psnr(calibrated, method: str, groups: int, a_bits: int) -> float:
    decoder, evaluation, reference, collector, state = calibrated
    decoder = copy.deepcopy(decoder)
    config = DGQConfig(method=method, w_bits=8, a_bits=a_bits, groups=groups, excluded_layers=[])
    quantize_from_stats(decoder, config, collector, state)
    with torch.no_grad():
        return float(np.mean([psnr(decoder(evaluation[name]), reference[name]) for name in EVALUATION_IMAGES]))


@pytest.mark.parametrize("a_bits", [6, 8])
def test_dgq_groups_beat_per_tensor_on_real_activations(calibrated, a_bits):
    dgq = decoder_psnr(calibrated, "dgq", 8, a_bits)
    per_tensor = decoder_psnr(calibrated, "pertensor", 1, a_bits)
    print(f"TAESD decoder W8A{a_bits}: DGQ K=8 {dgq:.2f} dB, per-tensor {per_tensor:.2f} dB")
    assert dgq > per_tensor
    assert dgq > 30


def test_the_shipped_weights_load_as_a_working_autoencoder():
    """What previews use (`service.previews.load_taesd`): encoder and decoder round-trip real photos; a wrong key
    mapping (the decoder's layers shifted by one) gives noise."""
    model = load_taesd()
    with torch.no_grad():
        round_trip = [psnr(model.decode(model.encoder(photo(name))).sample, photo(name)) for name in EVALUATION_IMAGES]
    assert min(round_trip) > 17, round_trip


def test_taesd_previews_on_the_worker(tiny_sd_model_dir):
    """A worker told to decode previews with TAESD sends them (8x the latent side), and the final image does not
    change: it always comes from the model's VAE."""
    import dgq_core
    from service.config import Settings
    from service.prompts import PromptStage
    from service.queue.base import QueuedJob
    from service.schemas import JobSpec
    from service.served_model import ServedModel
    from service.worker import BatchRunner

    settings = Settings(model=str(tiny_sd_model_dir), quantized="none", _env_file=None)
    model = ServedModel(settings)
    payload = dgq_core.pack_prompt_pair(*PromptStage(model, 4)._encode_cached(["a red square", ""]))
    job = QueuedJob(spec=JobSpec(id="t", model=model.name, width=16, height=16, steps=5, guidance_scale=7.5, seed=1,
                                 num_images=1, scheduler="euler", preview_every=4), payload=payload, model=model.name)
    pipe = model.load_worker_pipeline()
    outputs = {}
    for decoder in ("taesd", "vae"):
        progress = []
        outputs[decoder] = BatchRunner(pipe, decoder).run([job], progress.append).pngs
        [preview] = [png for p in progress for png in p.previews.values()]
        size = Image.open(io.BytesIO(preview)).size
        assert size == ((64, 64) if decoder == "taesd" else (16, 16)), (decoder, size)
    assert outputs["taesd"] == outputs["vae"]
