"""The bundled model: a small Stable-Diffusion-architecture text-to-image model trained on the shapes dataset.

`bundled_model_dir()` is a diffusers `save_pretrained` directory, loadable with
`StableDiffusionPipeline.from_pretrained(bundled_model_dir())`; MODEL_CARD.md beside this file says how it was trained.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "dgq-shapes"
BUNDLED_LORA_DIR_NAME = "loras"


def bundled_model_dir() -> Path:
    """Directory of the bundled model's weights (diffusers layout, safetensors)."""
    return Path(__file__).resolve().parent / BUNDLED_MODEL_NAME


def bundled_lora_dir() -> Path:
    """Directory of the bundled model's example LoRA adapters (`outlined.safetensors`, trained by
    `dgq-train-zoo --lora`; its JSON description beside it)."""
    return Path(__file__).resolve().parent / BUNDLED_LORA_DIR_NAME
