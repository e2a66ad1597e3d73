"""The API's image stage: uploaded images (image-to-image, inpainting) decoded, checked and brought to the output
size before a job is queued, so that a bad image never reaches a worker and every refusal says what to change."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from service.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP")
"""What an uploaded image may be."""


@dataclass
class EditImages:
    """What a worker needs of an edit job's images, at the output size.

    Args:
        image (`np.ndarray`): (height, width, 3) uint8 RGB, the image to start from.
        mask (`np.ndarray | None`): (height, width) uint8, 255 where the image is redrawn and 0 where it is kept;
            None for image-to-image.
    """

    image: np.ndarray
    mask: np.ndarray | None = None


def decode_base64(value: str, field: str) -> bytes:
    """The bytes of a base64 field (plain or a `data:` URL).

    Raises:
        InvalidRequest: `value` is not base64.
    """
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequest(f"{field} is not valid base64 ({error}): send the file's bytes base64-encoded, or upload "
                             "it as multipart/form-data") from error


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode an uploaded image, its size checked from the header before the pixels are decoded.

    Args:
        data (`bytes`): the file.
        field (`str`): the request field, for messages.
        max_pixels (`int`): most pixels allowed (`max_input_pixels`).

    Raises:
        InvalidRequest: not a PNG, JPEG or WebP image, larger than `max_pixels`, or it does not decode.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:  # Pillow's own bound, far above ours: refused from the header too
        raise _too_many_pixels(field, f"more than {2 * Image.MAX_IMAGE_PIXELS}", max_pixels) from error
    except Exception as error:  # any failure to read a header is a bad file, whatever the plugin raised
        raise InvalidRequest(f"{field} is not a PNG, JPEG or WebP image ({type(error).__name__}): send one of "
                             "those") from error
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(field, f"{width}x{height}", max_pixels)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:  # truncated or corrupt data: Pillow raises OSError, SyntaxError, ValueError, ...
        raise InvalidRequest(f"{field} could not be decoded ({type(error).__name__}: {error}): send a complete, "
                             "valid image file") from error


def _too_many_pixels(field: str, size: str, max_pixels: int) -> InvalidRequest:
    return InvalidRequest(f"{field} is {size} pixels, above the limit of {max_pixels} pixels (max_input_pixels): "
                          "send a smaller image")


def redraw_mask(mask: Image.Image) -> np.ndarray:
    """Where a mask asks for a redraw, as a bool array: its transparent pixels when it has transparency (OpenAI's
    convention), else its light pixels (white = redraw, as diffusers and most UIs draw masks)."""
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:
            return alpha < 128
    return np.asarray(mask.convert("L")) >= 128


def prepare_edit(image: bytes, mask: bytes | None, size: tuple[int, int], max_pixels: int) -> EditImages:
    """Decode and check an edit's image and mask and resize them to the output size.

    Args:
        image (`bytes`): the `init_image` file.
        mask (`bytes | None`): the mask file, for inpainting.
        size (`tuple[int, int]`): output (width, height).
        max_pixels (`int`): most pixels an upload may have.

    Raises:
        InvalidRequest: a bad file, too many pixels, a mask of another size than the image, or a mask that keeps
            every pixel.
    """
    init = open_image(image, "init_image", max_pixels).convert("RGB")
    resized = init if init.size == size else init.resize(size, Image.Resampling.LANCZOS)
    if mask is None:
        return EditImages(np.asarray(resized))
    mask_image = open_image(mask, "mask", max_pixels)
    if mask_image.size != init.size:
        raise InvalidRequest(
            f"mask is {mask_image.size[0]}x{mask_image.size[1]} but init_image is {init.size[0]}x{init.size[1]}: "
            "send a mask of the image's size"
        )
    redraw = Image.fromarray(redraw_mask(mask_image).astype(np.uint8) * 255)
    if redraw.size != size:
        redraw = redraw.resize(size, Image.Resampling.BILINEAR)
    redraw_pixels = (np.asarray(redraw) >= 128).astype(np.uint8) * 255
    if not redraw_pixels.any():
        raise InvalidRequest("mask marks no pixel to redraw: make the area to redraw transparent (or white in a mask "
                             "without transparency)")
    return EditImages(np.asarray(resized), redraw_pixels)
