"""The "shapes" dataset: procedurally generated, seeded images of one or two flat shapes with compositional prompts.

Every sample is a `Scene` (the attributes) rendered to a small RGB image and described by a prompt, e.g.
"a small red circle on a gray background" or "a red circle above a blue square on a yellow background".
A fixed, hash-chosen part of all compositions is held out of training (`split="heldout"`) so that alignment can be
measured on prompts the model never saw.

Everything is a pure function of its seed: `sample_scenes(n, seed, split)` always returns the same scenes, and
`render_scene` is deterministic, so training batches and evaluation sets are reproducible without storing images.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

# Well separated in RGB so that a nearest-palette-colour rule recovers them from slightly blurry generated images.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 225),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
OBJECT_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
BACKGROUND_COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "white",
    "black",
    "gray",
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Relation of the first object to the second; the prompt words for each.
RELATIONS: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left": "to the left of",
    "right": "to the right of",
}

IMAGE_SIZE = 32
# Side of a shape's bounding box in pixels: single objects come in two sizes, pairs are drawn at one medium size.
SIZE_PIXELS: dict[str, int] = {"small": 9, "large": 17}
PAIR_PIXELS = 11
HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Args:
        color: a name from `OBJECT_COLORS`.
        shape: a name from `SHAPES`.
        size: "small" or "large" for single objects; "medium" (not named in the prompt) for objects of a pair.
    """

    color: str
    shape: str
    size: str = "medium"


@dataclass(frozen=True)
class Scene:
    """The attributes of one image: what the prompt says and what the scorer checks.

    Args:
        objects: one object, or two objects where `relation` places the first relative to the second.
        background: a name from `BACKGROUND_COLORS`, never equal to an object's colour.
        relation: a key of `RELATIONS` for two objects, None for one.
    """

    objects: tuple[ShapeObject, ...]
    background: str
    relation: str | None = None

    @property
    def prompt(self) -> str:
        return scene_prompt(self)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(
            objects=tuple(ShapeObject(**obj) for obj in data["objects"]),
            background=data["background"],
            relation=data.get("relation"),
        )


def scene_prompt(scene: Scene) -> str:
    """The English prompt of a scene (lower case, words separated by single spaces)."""
    background = f"on a {scene.background} background"
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return f"a {obj.size} {obj.color} {obj.shape} {background}"
    first, second = scene.objects
    return f"a {first.color} {first.shape} {RELATIONS[scene.relation]} a {second.color} {second.shape} {background}"


def parse_prompt(prompt: str) -> Scene:
    """Inverse of `scene_prompt`.

    Args:
        prompt: a prompt of the dataset's grammar.

    Raises:
        ValueError: if the prompt is not of the grammar.
    """
    words = prompt.strip().lower().split()
    if (
        len(words) < 5
        or words[0] != "a"
        or words[-4:-1] != ["on", "a", words[-2]]
        or words[-1] != "background"
    ):
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    background = words[-2]
    body = words[:-4]
    if len(body) == 4:
        _, size, color, shape = body
        scene = Scene(objects=(ShapeObject(color, shape, size),), background=background)
    else:
        relation_words = " ".join(body[3:-3])
        relation = next((key for key, text in RELATIONS.items() if text == relation_words), None)
        if relation is None or body[-3] != "a":
            raise ValueError(f"not a shapes prompt: {prompt!r}")
        scene = Scene(
            objects=(ShapeObject(body[1], body[2]), ShapeObject(body[-2], body[-1])),
            background=background,
            relation=relation,
        )
    _validate(scene, prompt)
    return scene


def _validate(scene: Scene, prompt: str) -> None:
    colors = [obj.color for obj in scene.objects]
    valid = (
        scene.background in BACKGROUND_COLORS
        and all(obj.color in OBJECT_COLORS and obj.shape in SHAPES for obj in scene.objects)
        and all(obj.size in (SIZES if len(scene.objects) == 1 else ("medium",)) for obj in scene.objects)
        and len(set(colors + [scene.background])) == len(colors) + 1
    )
    if not valid:
        raise ValueError(f"not a shapes prompt: {prompt!r}")


def vocabulary() -> list[str]:
    """Every word that occurs in a prompt of the grammar, sorted."""
    words = {"a", "on", "background", *OBJECT_COLORS, *BACKGROUND_COLORS, *SHAPES, *SIZES}
    for text in RELATIONS.values():
        words.update(text.split())
    return sorted(words)


def all_scenes() -> list[Scene]:
    """Every composition of the grammar (without pixel positions), in a fixed order."""
    scenes = []
    for size, color, shape, background in itertools.product(SIZES, OBJECT_COLORS, SHAPES, BACKGROUND_COLORS):
        if color != background:
            scenes.append(Scene((ShapeObject(color, shape, size),), background))
    for (c1, s1), relation, (c2, s2), background in itertools.product(
        itertools.product(OBJECT_COLORS, SHAPES),
        RELATIONS,
        itertools.product(OBJECT_COLORS, SHAPES),
        BACKGROUND_COLORS,
    ):
        if len({c1, c2, background}) == 3:
            scenes.append(Scene((ShapeObject(c1, s1), ShapeObject(c2, s2)), background, relation))
    return scenes


def mirrored(scene: Scene) -> Scene | None:
    """A pair with its two objects swapped: the same words in the other order, drawn with the objects trading places
    (at the same placement seed). None for a single object."""
    if len(scene.objects) != 2:
        return None
    return Scene(objects=scene.objects[::-1], background=scene.background, relation=scene.relation)


def is_heldout(scene: Scene) -> bool:
    """Whether a composition is held out of training: a fixed hash of its prompt, so the split never changes."""
    digest = hashlib.sha256(scene.prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRACTION


def _split_scenes(split: str) -> list[Scene]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    scenes = all_scenes()
    if split == "all":
        return scenes
    return [scene for scene in scenes if is_heldout(scene) == (split == "heldout")]


_SPLIT_CACHE: dict[str, tuple[list[Scene], list[Scene]]] = {}


def _singles_and_pairs(split: str) -> tuple[list[Scene], list[Scene]]:
    if split not in _SPLIT_CACHE:
        scenes = _split_scenes(split)
        _SPLIT_CACHE[split] = (
            [s for s in scenes if len(s.objects) == 1],
            [s for s in scenes if len(s.objects) == 2],
        )
    return _SPLIT_CACHE[split]


def sample_scenes(num: int, seed: int, split: str = "train", pair_fraction: float = 0.6) -> list[Scene]:
    """Draw compositions of a split.

    Single-object and two-object compositions are drawn separately (there are ~60x more pairs), so that both kinds
    are well represented whatever the split.

    Args:
        num: how many scenes.
        seed: the random seed; the same (num, seed, split) always gives the same scenes.
        split: "train", "heldout" or "all".
        pair_fraction: expected fraction of two-object scenes.
    """
    singles, pairs = _singles_and_pairs(split)
    rng = np.random.default_rng([seed, 0x5CE7E])
    is_pair = rng.random(num) < pair_fraction
    single_idx = rng.integers(0, len(singles), num)
    pair_idx = rng.integers(0, len(pairs), num)
    return [
        pairs[p] if pair else singles[s] for pair, s, p in zip(is_pair, single_idx, pair_idx, strict=True)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, side: int, fill) -> None:
    """Draw one filled shape into the pixel box [left, left + side) x [top, top + side).

    Shapes are drawn on whole pixels with odd sides, so every instance of a (shape, size) is the same pixel pattern
    wherever it is placed; the scorer's templates are drawn with this same function.

    Args:
        draw: the PIL drawing context.
        shape: a name from `SHAPES`.
        left: first pixel column of the box.
        top: first pixel row of the box.
        side: box side in pixels.
        fill: PIL fill colour (an RGB tuple, or 1 on a mode "L" image).
    """
    right, bottom = left + side - 1, top + side - 1  # PIL boxes include their right/bottom pixel
    if shape == "square":
        draw.rectangle([left, top, right, bottom], fill=fill)
    elif shape == "circle":
        draw.ellipse([left, top, right, bottom], fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + (side - 1) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "cross":
        arm = side // 3 | 1  # odd, so the arms are centred
        offset = (side - arm) // 2
        draw.rectangle([left + offset, top, left + offset + arm - 1, bottom], fill=fill)
        draw.rectangle([left, top + offset, right, top + offset + arm - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def layout_scene(
    scene: Scene, rng: np.random.Generator, image_size: int = IMAGE_SIZE
) -> list[tuple[int, int, int]]:
    """Random pixel placement (left, top, side) of each object's box, consistent with the relation."""
    if len(scene.objects) == 1:
        side = SIZE_PIXELS[scene.objects[0].size] * image_size // IMAGE_SIZE | 1
        left, top = rng.integers(1, image_size - side, 2, endpoint=True)
        return [(int(left), int(top), side)]
    side = PAIR_PIXELS * image_size // IMAGE_SIZE | 1
    quarter = image_size // 4
    jitter_along = max(1, image_size // 16)
    jitter_across = max(1, image_size // 8)
    # The two objects' centres sit in opposite halves along the relation's axis, jittered on both axes.
    near = quarter + rng.integers(-jitter_along, jitter_along, endpoint=True)
    far = image_size - quarter + rng.integers(-jitter_along, jitter_along, endpoint=True)
    across = image_size // 2 + rng.integers(-jitter_across, jitter_across, 2, endpoint=True)
    first_along, second_along = (far, near) if scene.relation in ("below", "right") else (near, far)
    centres = (
        [(across[0], first_along), (across[1], second_along)]
        if scene.relation in ("above", "below")
        else [(first_along, across[0]), (second_along, across[1])]
    )
    return [(int(cx) - side // 2, int(cy) - side // 2, side) for cx, cy in centres]


# The "outlined" style (the example LoRA's): a one-pixel ring around each object, in the first of these colours that
# is neither the object's nor the background's.
OUTLINE_COLORS: tuple[str, ...] = ("black", "white", "gray")


def outline_color(obj: ShapeObject, background: str) -> str:
    """The colour of an object's outline in the "outlined" style."""
    return next(color for color in OUTLINE_COLORS if color not in (obj.color, background))


def outline_ring(mask: np.ndarray) -> np.ndarray:
    """The pixels just outside a boolean mask (its 8-neighbour dilation minus itself)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    dilated = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            dilated |= padded[dy : dy + height, dx : dx + width]
    return dilated & ~mask


def render_scene(scene: Scene, seed: int, image_size: int = IMAGE_SIZE, outlined: bool = False) -> Image.Image:
    """Render a scene to an RGB image; the seed fixes the placement.

    Args:
        scene: what to draw.
        seed: placement seed.
        image_size: side of the square image in pixels.
        outlined: draw each object with a one-pixel outline (`outline_color`), the example LoRA's style.
    """
    rng = np.random.default_rng([seed, 0x1A40])
    image = Image.new("RGB", (image_size, image_size), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj, (left, top, side) in zip(scene.objects, layout_scene(scene, rng, image_size), strict=True):
        if outlined:
            mask = Image.new("L", (image_size, image_size), 0)
            draw_shape(ImageDraw.Draw(mask), obj.shape, left, top, side, 1)
            ring = outline_ring(np.asarray(mask, dtype=bool))
            pixels = np.asarray(image).copy()
            pixels[ring] = PALETTE[outline_color(obj, scene.background)]
            image.paste(Image.fromarray(pixels))
        draw_shape(draw, obj.shape, left, top, side, PALETTE[obj.color])
    return image


def make_batch(
    num: int, seed: int, split: str = "train", image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[Scene]]:
    """A batch of rendered images and their scenes.

    Args:
        num: batch size.
        seed: the batch's seed (training uses one per step, so resuming reproduces the same batches).
        split: "train", "heldout" or "all".
        image_size: side of the square images in pixels.

    Returns:
        uint8 array of shape (num, image_size, image_size, 3) and the scenes in the same order.
    """
    scenes = sample_scenes(num, seed, split)
    images = np.stack(
        [np.asarray(render_scene(scene, placement_seed(seed, i), image_size)) for i, scene in enumerate(scenes)]
    )
    return images, scenes


def placement_seed(batch_seed: int, index: int) -> int:
    """The `render_scene` seed of image `index` of the batch `make_batch(..., batch_seed)` draws."""
    return batch_seed * 1_000_003 + index
