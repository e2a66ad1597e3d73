"""The bundled model: a small Stable-Diffusion-architecture text-to-image model trained on the shapes dataset.

`bundled_model_dir()` is a diffusers `save_pretrained` directory, loadable with
`StableDiffusionPipeline.from_pretrained(bundled_model_dir())`; MODEL_CARD.md beside this file says how it was trained.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "dgq-shapes"


def bundled_model_dir() -> Path:
    """Directory of the bundled model's weights (diffusers layout, safetensors)."""
    return Path(__file__).resolve().parent / BUNDLED_MODEL_NAME
