"""Admission by memory: what a request needs on a worker, from the worker's own measurements.

At warm-up a worker runs a few request shapes (`probe_shapes`) and measures the peak memory of each above what it
holds once loaded (`PeakMeter`: the resident set on the CPU, torch's peak allocation on CUDA). It fits the cost of
a shape (`fit_upper`): the denoising loop as a constant, a term in rows x pixels (the activations) and one in the
attention's largest score block (`dgq_core.ScoresFootprint`: quadratic in the area until the scores budget splits
it into blocks); the VAE decode, one image at a time, as a constant and a term in pixels. The fit, with what the
worker may use for requests, is its `MemoryProfile`, published through the queue: the API refuses a request that
does not fit a live worker even alone, and a worker forms no batch beyond it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import torch
from pydantic import BaseModel, ConfigDict
from scipy.optimize import nnls

import dgq_core
from service.schemas import SIZE_MULTIPLE, ModelLimits

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1 << 20
MARGIN = 1.15
"""The fitted cost is multiplied by this: allocator slack, and shapes between or beyond the measured ones."""
PROBE_SIDE_SCALE = 2
"""The largest probe's sides are this many times the native ones (held to the model's limits)."""


def rows_per_image(guidance_scale: float) -> int:
    """UNet rows per image: classifier-free guidance (scale above 1) runs a negative and a positive row."""
    return 2 if guidance_scale > 1.0 else 1


def scaled_to_area(width: int, height: int, pixels: int) -> tuple[int, int]:
    """The largest (width, height) of about the same aspect ratio, in multiples of 8, with at most `pixels`."""
    scale = min(1.0, math.sqrt(pixels / (width * height)))
    sides = [max(SIZE_MULTIPLE, int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in (width, height)]
    while sides[0] * sides[1] > pixels and max(sides) > SIZE_MULTIPLE:
        sides[sides.index(max(sides))] -= SIZE_MULTIPLE
    return sides[0], sides[1]


class MemoryProfile(BaseModel):
    """A worker's memory: what it may use for requests, and the fitted cost of a request shape.

    Crosses processes as JSON (`service.queue.wire`).
    """

    model_config = ConfigDict(frozen=True)

    worker_id: str
    device: str
    held_bytes: int
    """What the worker holds once loaded and warmed up (the model, and what its first runs leave resident; in the
    embedded mode the API's part too)."""
    budget_bytes: int
    """What it may use for requests beyond `held_bytes`."""
    budget_source: str
    """Where `budget_bytes` comes from, for messages: the setting, or the device's free memory."""
    vae_scale_factor: int
    scores: dgq_core.ScoresFootprint
    denoise: tuple[float, float, float]
    """Bytes of the denoising loop: constant, per row x pixel, per byte of the largest attention-score block."""
    decode: tuple[float, float]
    """Bytes of decoding one image: constant, per pixel."""

    def request_bytes(self, width: int, height: int, images: int, guidance_scale: float) -> int:
        """Memory a batch of `images` images of this size needs beyond `held_bytes`, with the margin."""
        rows, pixels = images * rows_per_image(guidance_scale), width * height
        scale = self.vae_scale_factor
        scores = self.scores.bytes(rows, math.ceil(height / scale), math.ceil(width / scale))
        denoise = self.denoise[0] + self.denoise[1] * rows * pixels + self.denoise[2] * scores
        decode = self.decode[0] + self.decode[1] * pixels
        return math.ceil(MARGIN * max(denoise, decode))

    def fits(self, width: int, height: int, images: int, guidance_scale: float) -> bool:
        return self.request_bytes(width, height, images, guidance_scale) <= self.budget_bytes

    def images_that_fit(self, width: int, height: int, guidance_scale: float, most: int) -> int:
        """How many images of this size one batch may hold within the budget, at most `most` (0: not even one)."""
        fitting = 0
        while fitting < most and self.fits(width, height, fitting + 1, guidance_scale):
            fitting += 1
        return fitting

    def refusal(self, width: int, height: int, images: int, guidance_scale: float) -> str | None:
        """Why a request of these values cannot run on this worker even alone, saying what would; None if it can."""
        need = self.request_bytes(width, height, images, guidance_scale)
        if need <= self.budget_bytes:
            return None
        what = f"{images} image(s) of {width}x{height}{' with guidance' if guidance_scale > 1 else ''}"
        message = (
            f"this request ({what}) needs about {need / MIB:.0f} MiB of memory to run, more than the "
            f"{self.budget_bytes / MIB:.0f} MiB worker {self.worker_id} has for requests ({self.budget_source}; "
            f"it holds {self.held_bytes / MIB:.0f} MiB for the model besides): "
        )
        if images > 1 and (fitting := self.images_that_fit(width, height, guidance_scale, images)):
            return message + f"ask for at most {fitting} image(s) of this size (or send several requests)"
        fitting_size = self._largest_size(width, height, guidance_scale)
        if fitting_size is None:
            return message + "this worker cannot run even the smallest image; give it more memory"
        return message + f"ask for one image of at most {fitting_size[0]}x{fitting_size[1]}"

    def _largest_size(self, width: int, height: int, guidance_scale: float) -> tuple[int, int] | None:
        """The largest size of about this aspect ratio one image of which fits, None if not even 8x8 does."""
        low, high = 0, width * height  # pixels: `low` fits (or is 0), `high` does not
        while high - low > SIZE_MULTIPLE**2:
            middle = (low + high) // 2
            if self.fits(*scaled_to_area(width, height, middle), 1, guidance_scale):
                low = middle
            else:
                high = middle
        if low == 0:
            return (SIZE_MULTIPLE, SIZE_MULTIPLE) if self.fits(SIZE_MULTIPLE, SIZE_MULTIPLE, 1, guidance_scale) else None
        return scaled_to_area(width, height, low)


def fit_upper(features: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Nonnegative least-squares coefficients of `features` (first column: the constant), then the constant raised
    until no measurement lies above the fit: an estimate that covers every measured shape.

    Columns the measurements cannot tell apart are left out (zero): with one measurement the cost is taken as
    proportional to the second column (conservative for larger shapes), with two as a line in it.

    Args:
        features (`np.ndarray`): (measurements, coefficients).
        measured (`np.ndarray`): (measurements,) bytes.
    """
    used = min(features.shape[1], len(measured))
    columns = [1] if used == 1 else list(range(used))
    coefficients = np.zeros(features.shape[1])
    coefficients[columns], _ = nnls(features[:, columns], measured)
    coefficients[0] += max(0.0, float(np.max(measured - features @ coefficients)))
    return coefficients


class PeakMeter:
    """Peak memory of a piece of work on one device: the resident set (CPU) or torch's allocations (CUDA).

    Args:
        device (`torch.device`): where the worker's UNet and VAE are.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def current(self) -> int:
        """Bytes held now (on the CPU: resident, once malloc has handed back what it keeps free)."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        dgq_core.trim_heap()
        return psutil.Process().memory_info().rss

    def peak(self, work: Callable[[], T]) -> tuple[T, int]:
        """Run `work`; its result and the peak bytes held while it ran."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            result = work()
            return result, torch.cuda.max_memory_allocated(self.device)
        dgq_core.trim_heap()  # memory kept free from earlier work would hide this work's own
        dgq_core.reset_peak_rss()
        result = work()
        return result, dgq_core.peak_rss_bytes()

    def free_beyond(self, held: int) -> int:
        """Bytes this process could use beyond `held`: the device's free memory, plus what it already has and
        does not hold (CUDA: cached by torch's allocator; CPU: resident from earlier work, kept by malloc)."""
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return free + torch.cuda.memory_reserved(self.device) - held
        return available_cpu_memory() + max(0, psutil.Process().memory_info().rss - held)


def available_cpu_memory() -> int:
    """Memory the host can still give: its available memory, or the cgroup's remaining limit when lower."""
    available = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, available)


def probe_shapes(native: tuple[int, int], limits: ModelLimits, most_images: int) -> list[tuple[int, int, int]]:
    """The (width, height, images) a worker measures at warm-up: one image at the native size, two (when a batch
    may hold two), and one image with `PROBE_SIDE_SCALE` times the native sides, held to the model's size limits.

    Args:
        native (`tuple[int, int]`): the model's native (width, height).
        limits (`ModelLimits`): the model's request limits.
        most_images (`int`): most images one batch may hold.
    """
    width, height = native
    shapes = [(width, height, 1)]
    if most_images >= 2:
        shapes.append((width, height, 2))
    large_width, large_height = scaled_to_area(
        min(PROBE_SIDE_SCALE * width, limits.max_width), min(PROBE_SIDE_SCALE * height, limits.max_height),
        limits.max_pixels,
    )
    if large_width * large_height > width * height:
        shapes.append((large_width, large_height, 1))
    return shapes


def measure_profile(
    worker_id: str, device: torch.device, shapes: list[tuple[int, int, int]],
    denoise: Callable[[int, int, int], torch.Tensor], decode: Callable[[torch.Tensor], object],
    scores: dgq_core.ScoresFootprint, vae_scale_factor: int, budget_mb: int | None,
) -> MemoryProfile:
    """Measure the peak memory of `shapes` and fit the worker's `MemoryProfile`.

    A shape whose cost, extrapolated from the shapes measured before it, would exceed the free memory is not run
    (a probe must not take the worker down).

    Args:
        worker_id (`str`): the worker's id, for messages.
        device (`torch.device`): the UNet's and VAE's device.
        shapes (`list[tuple[int, int, int]]`): (width, height, images) in increasing cost (`probe_shapes`).
        denoise (`Callable`): runs the denoising loop on (width, height, images) with guidance; returns the latents.
        decode (`Callable`): decodes one image's latents.
        scores (`dgq_core.ScoresFootprint`): the UNet's attention scores.
        vae_scale_factor (`int`): image side / latent side.
        budget_mb (`int | None`): the `request_memory_mb` setting; None = the free memory after the probes.
    """
    meter = PeakMeter(device)
    held = meter.current()
    free = meter.free_beyond(held)
    denoise_rows, decode_rows = [], []
    for width, height, images in shapes:
        rows, pixels = images * rows_per_image(guidance_scale=2.0), width * height
        if denoise_rows:  # extrapolate in proportion to rows x pixels from the largest measured shape
            measured_rows_pixels, _, measured_bytes = max(denoise_rows)
            expected = measured_bytes * rows * pixels / measured_rows_pixels
            if expected > free:
                log.warning("memory probe %dx%d x%d skipped: it would need about %.0f MiB, %.0f MiB are free",
                            width, height, images, expected / MIB, free / MIB)
                continue
        latents, peak = meter.peak(lambda w=width, h=height, n=images: denoise(w, h, n))
        scale = vae_scale_factor
        score_bytes = scores.bytes(rows, math.ceil(height / scale), math.ceil(width / scale))
        denoise_rows.append((rows * pixels, score_bytes, max(0, peak - held)))
        _, peak = meter.peak(lambda latent=latents[:1]: decode(latent))
        decode_rows.append((pixels, max(0, peak - held)))
        del latents
        log.info("memory probe %dx%d x%d: denoising %.1f MiB, decoding %.1f MiB above the %.0f MiB held",
                 width, height, images, denoise_rows[-1][2] / MIB, decode_rows[-1][1] / MIB, held / MIB)
    denoise_fit = fit_upper(np.array([[1.0, rp, sb] for rp, sb, _ in denoise_rows]),
                            np.array([float(m) for *_, m in denoise_rows]))
    decode_peaks: dict[int, int] = {}  # per pixel count: two probes of one size decode the same one image
    for pixels, measured in decode_rows:
        decode_peaks[pixels] = max(measured, decode_peaks.get(pixels, 0))
    decode_fit = fit_upper(np.array([[1.0, pixels] for pixels in decode_peaks]),
                           np.array([float(measured) for measured in decode_peaks.values()]))
    # First runs leave memory resident for good (kernel and allocator caches, thread pools); the costs above are
    # measured from before them, so they cover it, and what stays resident is held from here on.
    held = max(held, meter.current())
    if budget_mb is not None:
        budget, source = budget_mb * MIB, "request_memory_mb"
    else:
        budget, source = meter.free_beyond(held), f"the {device.type} memory free at its warm-up"
    profile = MemoryProfile(
        worker_id=worker_id, device=str(device), held_bytes=held, budget_bytes=budget, budget_source=source,
        vae_scale_factor=vae_scale_factor, scores=scores, denoise=tuple(float(c) for c in denoise_fit),
        decode=tuple(float(c) for c in decode_fit),
    )
    log.info("memory: %.0f MiB held, %.0f MiB for requests (%s); denoising %.0f MiB + %.3g B per row x pixel + "
             "%.2f x the attention scores; decoding %.0f MiB + %.3g B per pixel", held / MIB, budget / MIB, source,
             denoise_fit[0] / MIB, denoise_fit[1], denoise_fit[2], decode_fit[0] / MIB, decode_fit[1])
    return profile
