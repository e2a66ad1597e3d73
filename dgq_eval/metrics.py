"""Image metrics: Fréchet distance between feature sets, PSNR and SSIM between paired images."""

from __future__ import annotations

import numpy as np
from scipy import linalg

try:
    from skimage.metrics import structural_similarity
except ImportError as error:  # an install without the `eval` extra
    raise ImportError("dgq_eval needs scikit-image: pip install 'dgq-serve[eval]'") from error


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula of FID).

    Args:
        features_a: (N, D) features of one image set.
        features_b: (M, D) features of the other.
    """
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a = np.cov(features_a, rowvar=False)
    sigma_b = np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        # Rank-deficient covariances (fewer images than dimensions): regularise as pytorch-fid does.
        offset = np.eye(sigma_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images (inf when identical).

    Args:
        image: uint8 (H, W, 3).
        reference: uint8 (H, W, 3), e.g. the full-precision model's image for the same prompt and seed.
    """
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity of uint8 RGB images (mean over channels; 7x7 windows fit 32 px images).

    Args:
        image: uint8 (H, W, 3).
        reference: uint8 (H, W, 3).
    """
    return float(structural_similarity(image, reference, channel_axis=2, data_range=255))


def mean_psnr(images: np.ndarray, references: np.ndarray) -> float:
    """Mean PSNR over pairs, with identical pairs counted at 100 dB so that the mean stays finite.

    Args:
        images: uint8 (N, H, W, 3).
        references: uint8 (N, H, W, 3).
    """
    return float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(images, references, strict=True)]))


def mean_ssim(images: np.ndarray, references: np.ndarray) -> float:
    """Mean SSIM over pairs.

    Args:
        images: uint8 (N, H, W, 3).
        references: uint8 (N, H, W, 3).
    """
    return float(np.mean([ssim(a, b) for a, b in zip(images, references, strict=True)]))
