"""A small CNN trained to recognise the shapes dataset's attributes; its penultimate layer is the FID feature space.

Inception features (trained on ImageNet photos, fed 32 px images upsampled to 299 px) barely see what matters here;
a network trained on the dataset itself does: background colour, which (colour, shape) objects are present, and the
layout. Weights ship beside this file (`shapes_features.safetensors`, ~1 MB) and are rebuilt with

    python -m dgq_eval.features --steps 1500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dgq_zoo import shapes

WEIGHTS_PATH = Path(__file__).resolve().parent / "shapes_features.safetensors"
OBJECT_CLASSES = [f"{color} {shape}" for color in shapes.OBJECT_COLORS for shape in shapes.SHAPES]
LAYOUT_CLASSES = ["small", "large", "vertical pair", "horizontal pair"]
FEATURE_DIM = 256


def scene_targets(scene: shapes.Scene) -> tuple[int, np.ndarray, int]:
    """(background class, multi-hot present objects, layout class) of a scene."""
    background = shapes.BACKGROUND_COLORS.index(scene.background)
    present = np.zeros(len(OBJECT_CLASSES), np.float32)
    for obj in scene.objects:
        present[OBJECT_CLASSES.index(f"{obj.color} {obj.shape}")] = 1.0
    if len(scene.objects) == 1:
        layout = LAYOUT_CLASSES.index(scene.objects[0].size)
    else:
        layout = 2 if scene.relation in ("above", "below") else 3
    return background, present, layout


class ShapesFeatureNet(nn.Module):
    """Four 3x3 conv stages (32 px -> 4 px), a FEATURE_DIM embedding, and three attribute heads."""

    def __init__(self):
        super().__init__()
        widths = [3, 32, 64, 128, 128]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:], strict=False)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(8, c_out),
                nn.SiLU(),
            ]
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, FEATURE_DIM), nn.SiLU())
        self.background_head = nn.Linear(FEATURE_DIM, len(shapes.BACKGROUND_COLORS))
        self.objects_head = nn.Linear(FEATURE_DIM, len(OBJECT_CLASSES))
        self.layout_head = nn.Linear(FEATURE_DIM, len(LAYOUT_CLASSES))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """FEATURE_DIM features of float images (N, 3, 32, 32) in [-1, 1]."""
        return self.trunk(pixels)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.features(pixels)
        return self.background_head(features), self.objects_head(features), self.layout_head(features)

    @classmethod
    def from_pretrained(cls, path: str | Path = WEIGHTS_PATH) -> ShapesFeatureNet:
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)

    def save_pretrained(self, path: str | Path = WEIGHTS_PATH) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _batch(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, scenes = shapes.make_batch(num, seed, "all")
    targets = [scene_targets(scene) for scene in scenes]
    return (
        images_to_tensor(images),
        torch.tensor([t[0] for t in targets]),
        torch.from_numpy(np.stack([t[1] for t in targets])),
        torch.tensor([t[2] for t in targets]),
    )


@torch.no_grad()
def attribute_accuracy(model: ShapesFeatureNet, num: int = 2000, seed: int = 10_000_019) -> dict[str, float]:
    """Accuracy of each head on freshly generated real dataset images (the default seed is never trained on)."""
    pixels, background, present, layout = _batch(num, seed)
    background_logits, objects_logits, layout_logits = model(pixels)
    return {
        "background": float((background_logits.argmax(1) == background).float().mean()),
        "objects": float(((objects_logits > 0).float() == present).all(1).float().mean()),
        "layout": float((layout_logits.argmax(1) == layout).float().mean()),
    }


def train(steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3) -> ShapesFeatureNet:
    """Train the feature network on the whole dataset (both splits: it scores images, it is not evaluated on them).

    Args:
        steps: optimizer steps.
        seed: initialisation and batch seed.
        batch_size: images per step.
        lr: AdamW learning rate (cosine-decayed to zero).
    """
    torch.manual_seed(seed)
    model = ShapesFeatureNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in (bar := tqdm(range(steps), desc="feature net")):
        pixels, background, present, layout = _batch(batch_size, seed * 1_000_000 + step)
        # Mild noise, so features stay stable on generated images that are not exactly flat.
        pixels = pixels + 0.05 * torch.randn_like(pixels)
        background_logits, objects_logits, layout_logits = model(pixels)
        loss = (
            F.cross_entropy(background_logits, background)
            + F.binary_cross_entropy_with_logits(objects_logits, present) * len(OBJECT_CLASSES) / 2
            + F.cross_entropy(layout_logits, layout)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    """Train the feature network and write its weights and accuracy beside this module."""
    parser = argparse.ArgumentParser(prog="python -m dgq_eval.features", description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = train(args.steps, args.seed)
    model.save_pretrained(args.out)
    accuracy = attribute_accuracy(model)
    record = {"steps": args.steps, "seed": args.seed, "accuracy_on_unseen_images": accuracy}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
