"""Whether the example LoRA's style shows: the share of an image's pixels in the colour of its objects' outlines.

The "outlined" style (`dgq_zoo.shapes.render_scene(outlined=True)`, the example LoRA `dgq_zoo/loras/outlined`) rings
every object in `shapes.outline_color`, a colour that is neither the object's nor the background's. An image without
the style has almost no pixels of it; the scene's own rendering with outlines has a few percent (the rings). Outline
colours that are also an object's or the background's colour in the scene are left out: their pixels would count
the objects.
"""

from __future__ import annotations

import numpy as np

from dgq_eval.alignment import label_colors
from dgq_zoo import shapes


def outline_colors(scene: shapes.Scene) -> set[str]:
    """The outline colours of a scene's objects that are no object's or background's colour in it."""
    own = {obj.color for obj in scene.objects} | {scene.background}
    return {shapes.outline_color(obj, scene.background) for obj in scene.objects} - own


def outline_fraction(image: np.ndarray, scene: shapes.Scene) -> float:
    """Share of `image`'s pixels (uint8 H x W x 3) whose nearest palette colour is one of `outline_colors(scene)`."""
    palette = list(shapes.PALETTE)  # the order of `label_colors`' labels
    wanted = [palette.index(color) for color in outline_colors(scene)]
    return float(np.isin(label_colors(image), wanted).mean())


def mean_outline_fraction(images: np.ndarray, scenes: list[shapes.Scene]) -> float:
    """`outline_fraction` averaged over images and their scenes."""
    return float(np.mean([outline_fraction(image, scene) for image, scene in zip(images, scenes, strict=True)]))


def rendered_outline_fraction(scenes: list[shapes.Scene], seed: int) -> float:
    """The same figure for the scenes' own outlined renderings (what a perfect adapter would draw)."""
    images = np.stack([
        np.asarray(shapes.render_scene(scene, seed + i, outlined=True)) for i, scene in enumerate(scenes)
    ])  # fmt: skip
    return mean_outline_fraction(images, scenes)
