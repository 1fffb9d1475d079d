"""Image preprocessing before the network: plane fit, line flattening, smoothing, CLAHE.

Scanning-probe images (STM) and some STEM scans carry a tilt, line-to-line offsets and
noise that simulation does not; Smalley et al. flatten and equalise their STM images before
their U-Nets. The steps run in this fixed order, whatever order they are asked in:

1. **plane**: subtract the least-squares plane ``a + b·x + c·y``;
2. **lines**: flatten each scan line (an image row): subtract its median (``median``) or a
   least-squares polynomial of degree ``line_degree`` along the line (``poly``);
3. **gaussian**: Gaussian smoothing of σ = ``gaussian_sigma_A`` [Å];
4. **equalize**: global histogram equalisation, the rank transform ``rank(x) / N`` (ties
   share their mean rank): any monotonic change of the intensity scale (detector gain,
   offset, γ, an 8-bit display stretch) gives the same image, so the network sees the
   order of the intensities, not their ratios;
5. **clahe**: contrast-limited adaptive histogram equalisation
   (``skimage.exposure.equalize_adapthist``) on the image scaled to [0, 1] by its 0.5th and
   99.5th percentiles, tiles of ``clahe_kernel_A`` [Å], clip limit ``clahe_clip``.

The settings are a :class:`training.config.PreprocessConfig` (part of the training config,
so every checkpoint records them): training applies them to every image before the
per-image normalisation, and :meth:`training.predict.Ensemble.predict` (labelling,
evaluation, prediction) applies the model's again. :func:`parse_preprocess` reads the
command-line form ``plane,lines=median,gauss=0.5,equalize,clahe``. Pure functions, no file access.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: The order the steps run in.
STEPS = ("plane", "lines", "gaussian", "equalize", "clahe")


def plane_fit(image) -> np.ndarray:
    """Image minus its least-squares plane ``a + b·x + c·y`` (float64)."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.column_stack([np.ones(h * w), xx.ravel(), yy.ravel()])
    coef, *_ = np.linalg.lstsq(design, img.ravel(), rcond=None)
    return img - (design @ coef).reshape(h, w)


def flatten_lines(image, method: str = "median", degree: int = 1) -> np.ndarray:
    """Flatten each row (scan line): subtract its median or a polynomial fit along it.

    Parameters
    ----------
    image : array_like, shape (H, W)
    method : {"median", "poly"}
    degree : int
        Polynomial degree of ``poly`` (0 = the row mean).
    """
    img = np.asarray(image, dtype=np.float64)
    if method == "median":
        return img - np.median(img, axis=1, keepdims=True)
    if method != "poly":
        raise ValueError(f"lines: expected median or poly, got {method!r}")
    w = img.shape[1]
    x = np.linspace(-1.0, 1.0, w)
    vander = np.polynomial.polynomial.polyvander(x, int(degree))  # [W, d+1]
    coef, *_ = np.linalg.lstsq(vander, img.T, rcond=None)  # all rows at once
    return img - (vander @ coef).T


def equalize(image) -> np.ndarray:
    """Global histogram equalisation: each pixel's rank over the image size, in (0, 1)
    (equal values share their mean rank; a constant image maps to 0.5 everywhere)."""
    from scipy.stats import rankdata

    img = np.asarray(image, dtype=np.float64)
    if not np.isfinite(img).all():
        raise ValueError("equalize: the image holds NaN or infinite pixels")
    return (rankdata(img, method="average").reshape(img.shape) - 0.5) / img.size


def clahe(image, kernel_px: int, clip: float) -> np.ndarray:
    """CLAHE (scikit-image) of the image scaled to [0, 1] by its 0.5–99.5th percentiles."""
    from skimage.exposure import equalize_adapthist

    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    scaled = np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(img)
    kernel = max(2, min(int(kernel_px), *img.shape))
    return equalize_adapthist(scaled, kernel_size=kernel, clip_limit=float(clip))


def preprocess_image(image, config, pixel_size_A: float) -> np.ndarray:
    """Apply a :class:`~training.config.PreprocessConfig` to one image.

    Parameters
    ----------
    image : array_like, shape (H, W)
    config : PreprocessConfig or dict or None
        ``None`` or a config with every step off returns the image unchanged (float32).
    pixel_size_A : float
        [Å/px] of ``image`` (converts σ and the CLAHE tile size to pixels).

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    from training.config import PreprocessConfig

    if config is None:
        return np.asarray(image, dtype=np.float32)
    cfg = config if isinstance(config, PreprocessConfig) else PreprocessConfig.from_dict(config)
    if not cfg.active:
        return np.asarray(image, dtype=np.float32)
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image: expected [H, W], got shape {img.shape}")
    if cfg.plane:
        img = plane_fit(img)
    if cfg.lines != "none":
        img = flatten_lines(img, cfg.lines, cfg.line_degree)
    if cfg.gaussian_sigma_A > 0:
        img = ndimage.gaussian_filter(img, cfg.gaussian_sigma_A / pixel_size_A, mode="reflect")
    if cfg.equalize:
        img = equalize(img)
    if cfg.clahe:
        img = clahe(img, round(cfg.clahe_kernel_A / pixel_size_A), cfg.clahe_clip)
    return img.astype(np.float32)


def parse_preprocess(text: str | None) -> dict:
    """Read ``plane,lines=median,gauss=0.5,clahe=0.02`` into PreprocessConfig fields.

    Items: ``plane``; ``lines=median`` or ``lines=poly`` / ``lines=polyN`` (degree N,
    default 1); ``gauss=SIGMA`` [Å]; ``clahe`` or ``clahe=CLIP``; ``none`` (all off).

    Raises
    ------
    ValueError
        An unknown item or a bad value (the message names it).
    """
    out: dict = {}
    if text is None:
        return out
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.strip().lower()
        try:
            if key == "none":
                out.update(
                    plane=False, lines="none", gaussian_sigma_A=0.0, equalize=False, clahe=False
                )
            elif key in ("equalize", "equalise") and not value:
                out["equalize"] = True
            elif key == "plane" and not value:
                out["plane"] = True
            elif key == "lines":
                v = value.strip().lower() or "median"
                if v.startswith("poly"):
                    out["lines"] = "poly"
                    out["line_degree"] = int(v[4:] or 1)
                elif v == "median":
                    out["lines"] = "median"
                else:
                    raise ValueError
            elif key in ("gauss", "gaussian"):
                out["gaussian_sigma_A"] = float(value)
            elif key == "clahe":
                out["clahe"] = True
                if value:
                    out["clahe_clip"] = float(value)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--preprocess: cannot read {item!r}; expected items plane, lines=median, "
                "lines=poly2, gauss=0.5 (σ in Å), equalize, clahe or clahe=0.01, "
                "comma-separated"
            ) from None
    return out
