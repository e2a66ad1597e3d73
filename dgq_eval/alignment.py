"""Text-image alignment for the shapes dataset by deterministic image analysis.

An image is checked against the `Scene` its prompt describes: background colour, each object's colour and shape,
the size of a single object, and the spatial relation of a pair. Pixels are labelled with the nearest palette colour,
the background is the most frequent label, objects are the largest connected components of the prompt's colours
(after a 3x3 opening, so that one-pixel colour fringes at blurred edges are not taken for objects), and a shape is
the template (rendered at the component's bounding box) with the highest IoU against how much each pixel around
the component is the object's colour rather than the background's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from dgq_zoo import shapes

_PALETTE_NAMES = list(shapes.PALETTE)
_PALETTE_RGB = np.array([shapes.PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float32)
# Components smaller than this (pixels, after opening) are noise, not objects: the smallest object covers ~40.
MIN_OBJECT_PIXELS = 8
# Bounding-box side (pixels at 32 px) between the small (9) and large (17) single objects.
LARGE_SIDE_THRESHOLD = 13
# Gaussian sigmas (pixels) of the template versions a shape is matched against.
TEMPLATE_BLURS = (0.0, 1.0)


@dataclass
class DetectedObject:
    """One object found in an image.

    Args:
        color: palette colour name.
        shape: best-matching shape name.
        side: bounding-box side in pixels (the larger of height and width).
        center: (column, row) centroid in pixels.
        pixels: area in pixels.
    """

    color: str
    shape: str
    side: int
    center: tuple[float, float]
    pixels: int


@dataclass
class AlignmentResult:
    """Which of a prompt's attributes an image shows.

    Args:
        checks: attribute name -> passed, e.g. {"background": True, "color_0": True, "shape_0": False, ...}.
        background: the detected background colour.
        objects: the detected object of each of the prompt's objects (None where its colour was not found).
    """

    checks: dict[str, bool]
    background: str
    objects: list[DetectedObject | None] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        """All attributes shown."""
        return all(self.checks.values())

    @property
    def attribute_accuracy(self) -> float:
        return sum(self.checks.values()) / len(self.checks)


def label_colors(image: np.ndarray) -> np.ndarray:
    """Nearest-palette-colour label of every pixel (indices into `shapes.PALETTE` order)."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    distances = ((pixels[:, None, :] - _PALETTE_RGB[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1).reshape(image.shape[:2])


def _template_masks(left: int, top: int, side: int, size: int) -> dict[str, np.ndarray]:
    masks = {}
    for shape in shapes.SHAPES:
        canvas = Image.new("L", (size, size), 0)
        shapes.draw_shape(ImageDraw.Draw(canvas), shape, left, top, side, 1)
        masks[shape] = np.asarray(canvas, dtype=bool)
    return masks


def presence_map(image: np.ndarray, color: str, background: str) -> np.ndarray:
    """How much each pixel is `color` rather than `background`: its position on the RGB segment between them,
    clipped to [0, 1]. Blurred edges get fractional values instead of snapping to whichever third palette colour
    happens to lie nearer (orange between red and yellow, say).
    """
    object_rgb = _PALETTE_RGB[_PALETTE_NAMES.index(color)]
    background_rgb = _PALETTE_RGB[_PALETTE_NAMES.index(background)]
    direction = object_rgb - background_rgb
    projection = (image.astype(np.float32) - background_rgb) @ direction / float(direction @ direction)
    return np.clip(projection, 0.0, 1.0)


def classify_shape(
    mask: np.ndarray, presence: np.ndarray | None = None
) -> tuple[str, int, tuple[float, float]]:
    """Shape of one object by IoU with the dataset's shape templates.

    Args:
        mask: boolean (H, W) mask of one connected object.
        presence: optional `presence_map` of the object's colour; when given, the shape is matched on it around
            the mask (soft IoU), which keeps thin parts (a cross's arms, a triangle's tip) that blur pushes below
            the nearest-colour threshold.

    Returns:
        (shape name, bounding-box side, (column, row) centroid).
    """
    target = mask.astype(np.float32)
    if presence is not None:
        window = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=2)
        target = np.where(window, presence, 0.0)
        mask = mask | (target > 0.5)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = bottom - top, right - left
    side = int(max(height, width))
    # Templates are drawn with the dataset's own renderer in a square box centred on the component's bounding box.
    box_left, box_top = left + (width - side) // 2, top + (height - side) // 2
    best_shape, best_iou = shapes.SHAPES[0], -1.0
    for shape, template in _template_masks(box_left, box_top, side, mask.shape[0]).items():
        # Sharp and blurred versions of the template: generated images are often slightly soft.
        for blur in TEMPLATE_BLURS:
            soft = ndimage.gaussian_filter(template.astype(np.float32), blur) if blur else template
            iou = np.minimum(soft, target).sum() / max(np.maximum(soft, target).sum(), 1e-6)
            if iou > best_iou:
                best_shape, best_iou = shape, iou
    return best_shape, side, (float(cols.mean()), float(rows.mean()))


def detect_object(
    labels: np.ndarray, color: str, presence: np.ndarray | None = None
) -> DetectedObject | None:
    """The largest object of one colour, or None if there is none.

    Args:
        labels: output of `label_colors`.
        color: palette colour name.
        presence: optional `presence_map` of the colour against the background, for the shape (see
            `classify_shape`).
    """
    mask = labels == _PALETTE_NAMES.index(color)
    core = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    if core.sum() < MIN_OBJECT_PIXELS:
        return None
    components, count = ndimage.label(mask)
    # The largest component that contains some of the opened core: the object with its full outline.
    sizes = ndimage.sum(core, components, index=np.arange(1, count + 1))
    component = components == (int(np.argmax(sizes)) + 1)
    shape, side, center = classify_shape(component, presence)
    return DetectedObject(color=color, shape=shape, side=side, center=center, pixels=int(component.sum()))


def _relation_holds(relation: str, first: DetectedObject, second: DetectedObject) -> bool:
    dx = first.center[0] - second.center[0]
    dy = first.center[1] - second.center[1]
    along, across = (dy, dx) if relation in ("above", "below") else (dx, dy)
    sign = -1 if relation in ("above", "left") else 1
    return sign * along > 0 and abs(along) > abs(across)


def score_image(image: np.ndarray | Image.Image, scene: shapes.Scene) -> AlignmentResult:
    """Check an image against the attributes of a scene (its prompt).

    Args:
        image: RGB image, uint8 (H, W, 3) array or PIL image, at the dataset's 32 px (other sizes are resized).
        scene: what the prompt asks for (`shapes.parse_prompt(prompt)`).
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
            image = image.resize((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), Image.BILINEAR)
        image = np.asarray(image)
    elif image.shape[:2] != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
        image = np.asarray(
            Image.fromarray(image).resize((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), Image.BILINEAR)
        )
    labels = label_colors(image)
    background = _PALETTE_NAMES[int(np.bincount(labels.ravel(), minlength=len(_PALETTE_NAMES)).argmax())]
    checks = {"background": background == scene.background}
    detected = []
    for i, obj in enumerate(scene.objects):
        found = None
        if obj.color != background:
            found = detect_object(labels, obj.color, presence_map(image, obj.color, background))
        detected.append(found)
        checks[f"color_{i}"] = found is not None
        checks[f"shape_{i}"] = found is not None and found.shape == obj.shape
    if len(scene.objects) == 1:
        found = detected[0]
        checks["size_0"] = found is not None and (found.side >= LARGE_SIDE_THRESHOLD) == (obj.size == "large")
    else:
        first, second = detected
        checks["relation"] = (
            first is not None and second is not None and _relation_holds(scene.relation, first, second)
        )
    return AlignmentResult(checks=checks, background=background, objects=detected)


@dataclass
class AlignmentSummary:
    """Alignment over a set of images.

    Args:
        accuracy: fraction of images that show every attribute of their prompt (the headline number).
        attribute_accuracy: fraction of all attribute checks passed.
        per_attribute: check kind ("background", "color", "shape", "size", "relation") -> fraction passed.
        num_images: how many images were scored.
    """

    accuracy: float
    attribute_accuracy: float
    per_attribute: dict[str, float]
    num_images: int


def score_images(images, scenes) -> AlignmentSummary:
    """Score each image against its scene and aggregate.

    Args:
        images: (N, H, W, 3) uint8 images (or any sequence of them).
        scenes: the N scenes (parsed prompts) they should show.
    """
    return summarize([score_image(image, scene) for image, scene in zip(images, scenes, strict=True)])


def summarize(results: list[AlignmentResult]) -> AlignmentSummary:
    """Aggregate per-image results.

    Args:
        results: outputs of `score_image`.
    """
    per_kind: dict[str, list[bool]] = {}
    for result in results:
        for name, passed in result.checks.items():
            per_kind.setdefault(name.split("_")[0], []).append(passed)
    all_checks = [passed for result in results for passed in result.checks.values()]
    return AlignmentSummary(
        accuracy=float(np.mean([r.correct for r in results])),
        attribute_accuracy=float(np.mean(all_checks)),
        per_attribute={kind: float(np.mean(values)) for kind, values in sorted(per_kind.items())},
        num_images=len(results),
    )
