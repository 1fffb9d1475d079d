"""Image normalisation and augmentations that move image and labels together (NumPy only).

Every random function takes an explicit ``rng`` (a ``numpy.random.Generator``); the
dataset builds it from ``(seed, epoch, draw)`` so a crop and its augmentation do not depend
on the number of workers or on global random state.
"""

from __future__ import annotations

import numpy as np

#: Percentiles of the per-image normalisation (see :func:`normalize_image`).
NORM_PERCENTILES = (1.0, 99.0)


def normalize_image(image, percentiles: tuple[float, float] = NORM_PERCENTILES) -> np.ndarray:
    """Per-image intensity normalisation used for training and inference alike.

    The image is mapped affinely so that its ``percentiles[0]`` percentile goes to 0 and
    its ``percentiles[1]`` percentile to 1: ``(image − p_lo) / (p_hi − p_lo)``. Percentiles
    rather than min/max or mean/std keep a few hot pixels or a contaminated patch from
    setting the scale, and the result does not depend on the units (counts at any dose, or
    relative units). A flat image (``p_hi == p_lo``) is only shifted to 0 (divided by its
    standard deviation when non-zero).

    Parameters
    ----------
    image : array_like, shape (H, W)
        Recorded image in any units.
    percentiles : (float, float)
        Lower and upper percentile [%].

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image: expected a 2-D array [H, W], got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError("image: contains NaN or infinite values")
    lo, hi = np.percentile(img, percentiles)
    scale = hi - lo
    if scale <= 0:
        lo = float(img.mean())
        std = float(img.std())
        scale = std if std > 0 else 1.0
    return ((img - np.float32(lo)) / np.float32(scale)).astype(np.float32)


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Apply symmetry ``k`` (0–7) of the square to the last two axes.

    ``k % 4`` quarter turns, then a left-right flip when ``k >= 4``; ``k = 0`` is the
    identity.

    Parameters
    ----------
    array : ndarray, shape (..., H, W)
    k : int
        Index of the symmetry in ``0..7``.

    Returns
    -------
    ndarray
        A contiguous copy.
    """
    if not 0 <= k < 8:
        raise ValueError(f"k: expected 0..7, got {k}")
    out = np.rot90(array, k % 4, axes=(-2, -1))
    if k >= 4:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def inverse_dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Undo :func:`dihedral` with the same ``k``."""
    if not 0 <= k < 8:
        raise ValueError(f"k: expected 0..7, got {k}")
    out = array[..., ::-1] if k >= 4 else array
    return np.ascontiguousarray(np.rot90(out, -(k % 4), axes=(-2, -1)))


def random_crop(image, mask, size: int, rng: np.random.Generator):
    """Cut the same random ``size × size`` window out of an image and its mask.

    Parameters
    ----------
    image, mask : ndarray, shape (H, W)
    size : int
        Side of the window [px]; 0, or not smaller than the image, returns them whole.
    rng : numpy.random.Generator

    Returns
    -------
    image, mask : ndarray
    """
    h, w = image.shape
    if size <= 0 or (size >= h and size >= w):
        return image, mask
    if size > h or size > w:
        raise ValueError(f"crop: {size} px is larger than an image of {h}×{w} px")
    r = int(rng.integers(0, h - size + 1))
    c = int(rng.integers(0, w - size + 1))
    return image[r : r + size, c : c + size], mask[r : r + size, c : c + size]


def augment(
    image,
    mask,
    rng: np.random.Generator,
    *,
    dihedral_group: bool = True,
    scale: tuple[float, float] = (1.0, 1.0),
    offset: tuple[float, float] = (0.0, 0.0),
    noise_std: float = 0.0,
):
    """Random geometric and intensity augmentation of a normalised image and its mask.

    The geometric part (one of the 8 symmetries of the square) moves the labels with the
    image; the intensity part (``image · s + o + n``, with ``s`` log-uniform in ``scale``,
    ``o`` uniform in ``offset`` and ``n`` Gaussian noise of a standard deviation drawn
    uniformly in ``[0, noise_std]``) leaves the labels alone. Applied after
    :func:`normalize_image`, it makes the network tolerant of an imperfect normalisation.

    Parameters
    ----------
    image : ndarray of float32, shape (H, W)
        Normalised image.
    mask : ndarray, shape (H, W)
        Class-id mask.
    rng : numpy.random.Generator
    dihedral_group : bool
        Draw a flip/rotation.
    scale, offset : (float, float)
        Ranges of the intensity factor and offset (normalised units).
    noise_std : float
        Largest standard deviation of the extra Gaussian noise (normalised units).

    Returns
    -------
    image, mask : ndarray
    """
    if dihedral_group:
        k = int(rng.integers(8))
        image, mask = dihedral(image, k), dihedral(mask, k)
    s = float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
    o = float(rng.uniform(offset[0], offset[1]))
    image = image * np.float32(s) + np.float32(o)
    if noise_std > 0:
        sigma = float(rng.uniform(0.0, noise_std))
        image = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return image.astype(np.float32, copy=False), mask
