"""Per-sample labels: class masks, class heatmaps and the column table, in recorded pixels.

Labels are rasterised at the column positions *in the recorded image*
(:func:`simgen.acquisition.map_positions` / :attr:`simgen.acquisition.Acquired.rows`), so
they follow every scan distortion. Geometry follows ``docs/architecture.md``: images are
``[H, W] = [rows (y), cols (x)]``, pixel centres at integers, class 0 is background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from simgen.backend import get_array_module, to_numpy
from simgen.configbase import Config

__all__ = [
    "ColumnLabels",
    "LabelConfig",
    "class_heatmaps",
    "class_mask",
    "column_labels",
    "make_labels",
]

#: Mask value of a pixel without a label: class masks of simulations never hold it; the
#: pseudo-labels of ``simgen-train adapt`` leave the sites the network was unsure of
#: unlabelled, and training gives those pixels no loss and no score.
UNLABELLED = 255

_KINDS = ("mask", "heatmap", "both")
_TABLE_FIELDS = ("class_id", "site", "n_atoms", "counts", "composition", "defect")


@dataclass(frozen=True)
class LabelConfig(Config):
    """How dense labels are rasterised.

    Parameters
    ----------
    kind : {"mask", "heatmap", "both"}
        ``mask``: uint8 class per pixel (disks); ``heatmap``: float32 ``[n_classes, H, W]``
        Gaussian per column in its class's channel; ``both``.
    disk_radius_A : float
        Disk radius of a column in the mask [Å]. Where disks overlap the nearest column
        wins. 2H-MX2 metal–chalcogen columns are a/√3 ≈ 1.8 Å apart in projection, so radii
        up to ~0.9 Å do not touch.
    heatmap_sigma_A : float
        Gaussian σ of a column in the heatmaps [Å] (truncated at 3σ).
    """

    kind: str = "mask"
    disk_radius_A: float = 0.7
    heatmap_sigma_A: float = 0.4

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"kind: expected one of {_KINDS}, got {self.kind!r}")
        for name in ("disk_radius_A", "heatmap_sigma_A"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name}: must be a number > 0 Å, got {value!r}")


def _positions(rows, cols, class_ids):
    xp = get_array_module(rows)
    r = xp.asarray(rows, dtype=xp.float64).ravel()
    c = xp.asarray(cols, dtype=xp.float64).ravel()
    k = xp.asarray(class_ids).ravel()
    if r.shape != c.shape or r.shape != k.shape:
        raise ValueError(f"cols, class_ids: shapes {c.shape}, {k.shape} differ from rows {r.shape}")
    if r.size and not bool(xp.all(xp.isfinite(r)) and xp.all(xp.isfinite(c))):
        raise ValueError("rows: positions must be finite")
    return xp, r, c, k.astype(xp.int64)


def _windows(xp, r, c, half: int, shape):
    """Pixel windows of ±half around each position: (flat index, d², column index, valid)."""
    h, w = shape
    off = xp.arange(-half, half + 1)
    rr = xp.rint(r).astype(xp.int64)[:, None] + off  # (n, m)
    cc = xp.rint(c).astype(xp.int64)[:, None] + off
    d2 = (rr - r[:, None])[:, :, None] ** 2 + (cc - c[:, None])[:, None, :] ** 2
    valid = ((rr >= 0) & (rr < h))[:, :, None] & ((cc >= 0) & (cc < w))[:, None, :]
    flat = xp.clip(rr, 0, h - 1)[:, :, None] * w + xp.clip(cc, 0, w - 1)[:, None, :]
    col = xp.broadcast_to(xp.arange(r.size)[:, None, None], d2.shape)
    return flat, d2, col, valid


def class_mask(rows, cols, class_ids, shape, *, radius_px: float):
    """Class mask: disks of ``radius_px`` at the columns, nearest column wins.

    A pixel (r, c) belongs to the column at the smallest distance
    ``√((r − row)² + (c − col)²)`` when that distance is ≤ ``radius_px``; exact ties go to
    the column listed first. Columns outside the image still paint the part of their disk
    that lies inside it. A column of class 0 claims its disk as background.

    Parameters
    ----------
    rows, cols : ndarray (NumPy or CuPy), shape (N,)
        Column positions in recorded-image pixels (row = y, col = x).
    class_ids : ndarray of int, shape (N,)
        Class of each column (0–255).
    shape : (int, int)
        Image shape ``(H, W)``.
    radius_px : float
        Disk radius [px].

    Returns
    -------
    ndarray of uint8, shape (H, W), on the device of ``rows``
    """
    xp, r, c, k = _positions(rows, cols, class_ids)
    h, w = (int(v) for v in shape)
    if not radius_px > 0:
        raise ValueError(f"radius_px: must be > 0, got {radius_px}")
    if k.size and (int(k.min()) < 0 or int(k.max()) > 255):
        raise ValueError("class_ids: must lie in 0..255 for a uint8 mask")
    mask = xp.zeros(h * w, dtype=xp.uint8)
    if r.size == 0:
        return mask.reshape(h, w)
    if xp is np:  # the same rule, one compiled pass over the windows
        from simgen.rasterize import paint_disks

        return paint_disks(r, c, k, (h, w), float(radius_px))
    flat, d2, col, valid = _windows(xp, r, c, int(math.ceil(radius_px)), (h, w))
    keep = valid & (d2 <= radius_px * radius_px)
    flat, d2, col = flat[keep], d2[keep], col[keep]
    # Per pixel: the smallest distance, then the first column at exactly that distance.
    # Two scatter-minimum passes give the winner a lexsort by (pixel, d², column) would,
    # without sorting every window pixel.
    best = xp.full(h * w, xp.inf)
    _scatter_min(xp, best, flat, d2)
    at_best = d2 == best[flat]
    first = xp.full(h * w, r.size, dtype=xp.int64)
    _scatter_min(xp, first, flat[at_best], col[at_best])
    won = first < r.size
    mask[won] = k[first[won]].astype(xp.uint8)
    return mask.reshape(h, w)


def _scatter_min(xp, out, index, values) -> None:
    """``out[index] = min(out[index], values)`` with repeated indices (NumPy or CuPy)."""
    if xp is np:
        np.minimum.at(out, index, values)
    else:  # pragma: no cover - GPU only
        import cupyx

        cupyx.scatter_min(out, index, values)


def class_heatmaps(rows, cols, class_ids, shape, n_classes: int, *, sigma_px: float):
    """Gaussian heatmaps per class, ``[n_classes, H, W]`` float32.

    Channel k ≥ 1 is the maximum over the columns of class k of
    ``exp(−d²/2σ²)`` (truncated at 3σ), so overlapping columns do not add up above 1;
    channel 0 (background) is ``1 − max`` over the other channels. Columns of class 0 are
    not drawn.

    Parameters
    ----------
    rows, cols : ndarray (NumPy or CuPy), shape (N,)
        Column positions in recorded-image pixels.
    class_ids : ndarray of int, shape (N,)
        Class of each column, in ``0..n_classes − 1``.
    shape : (int, int)
        Image shape ``(H, W)``.
    n_classes : int
        Number of classes including background.
    sigma_px : float
        Gaussian σ [px].

    Returns
    -------
    ndarray of float32, shape (n_classes, H, W), on the device of ``rows``
    """
    xp, r, c, k = _positions(rows, cols, class_ids)
    h, w = (int(v) for v in shape)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes: must be an integer >= 1, got {n_classes!r}")
    if not sigma_px > 0:
        raise ValueError(f"sigma_px: must be > 0, got {sigma_px}")
    if k.size and (int(k.min()) < 0 or int(k.max()) >= n_classes):
        raise ValueError(f"class_ids: must lie in 0..{n_classes - 1}")
    out = xp.zeros(n_classes * h * w, dtype=xp.float32)
    sel = k > 0
    if bool(sel.any()):
        r, c, k = r[sel], c[sel], k[sel]
        flat, d2, col, valid = _windows(xp, r, c, int(math.ceil(3 * sigma_px)), (h, w))
        keep = valid & (d2 <= (3 * sigma_px) ** 2)
        value = xp.exp(-d2[keep] / (2 * sigma_px * sigma_px))
        idx = k[col[keep]] * (h * w) + flat[keep]
        order = xp.lexsort(xp.stack([-value, idx]))  # by channel-pixel, largest value first
        fs = idx[order]
        first = xp.ones(fs.shape, dtype=bool)
        first[1:] = fs[1:] != fs[:-1]
        out[fs[first]] = value[order][first].astype(xp.float32)
    out = out.reshape(n_classes, h, w)
    if n_classes > 1:
        out[0] = 1.0 - out[1:].max(axis=0)
    else:
        out[0] = 1.0
    return out


def make_labels(
    rows,
    cols,
    class_ids,
    shape,
    config: LabelConfig | None = None,
    *,
    pixel_size_A: float,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """Dense labels of one sample as the config asks.

    Parameters
    ----------
    rows, cols : ndarray, shape (N,)
        Column positions in recorded-image pixels.
    class_ids : ndarray of int, shape (N,)
    shape : (int, int)
        Recorded image shape.
    config : LabelConfig, optional
    pixel_size_A : float
        Pixel size [Å].
    n_classes : int, optional
        Classes including background (needed for heatmaps; default ``max(class_ids) + 1``).

    Returns
    -------
    dict
        ``"mask"`` (uint8 [H, W]) and/or ``"heatmaps"`` (float32 [n_classes, H, W]).
    """
    cfg = config or LabelConfig()
    if not (isinstance(pixel_size_A, int | float) and pixel_size_A > 0):
        raise ValueError(f"pixel_size_A: must be > 0 Å, got {pixel_size_A!r}")
    out: dict[str, Any] = {}
    if cfg.kind in ("mask", "both"):
        out["mask"] = class_mask(
            rows, cols, class_ids, shape, radius_px=cfg.disk_radius_A / pixel_size_A
        )
    if cfg.kind in ("heatmap", "both"):
        if n_classes is None:
            ids = to_numpy(class_ids)
            n_classes = int(ids.max()) + 1 if ids.size else 1
        out["heatmaps"] = class_heatmaps(
            rows, cols, class_ids, shape, n_classes, sigma_px=cfg.heatmap_sigma_A / pixel_size_A
        )
    return out


@dataclass(frozen=True)
class ColumnLabels:
    """Column table of one sample in recorded-image pixels.

    Attributes
    ----------
    index : ndarray of int64, shape (M,)
        Row of each entry in the input column table (keeps the two aligned).
    x, y : ndarray of float64, shape (M,)
        Sub-pixel position in the recorded image: ``x`` = column, ``y`` = row [px].
    inside : ndarray of bool, shape (M,)
        The column lies on the recorded field.
    class_id, site, n_atoms, counts, composition, defect : ndarray or None
        Copied from the input table where it has them.
    """

    index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    inside: np.ndarray
    class_id: np.ndarray | None = None
    site: np.ndarray | None = None
    n_atoms: np.ndarray | None = None
    counts: np.ndarray | None = None
    composition: np.ndarray | None = None
    defect: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.index.size)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The fields present, as a dict of arrays."""
        names = ("index", "x", "y", "inside", *_TABLE_FIELDS)
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def column_labels(table, rows, cols, inside, *, keep: str = "inside") -> ColumnLabels:
    """Column table in recorded-image pixels, aligned with the input table.

    Parameters
    ----------
    table : object or mapping
        The input column table (e.g. ``structures.ColumnTable``); any of
        ``class_id, site, n_atoms, counts, composition, defect`` it has (attribute or key)
        is copied.
    rows, cols : array_like, shape (N,)
        Recorded positions of the table's columns (:attr:`Acquired.rows`, ``.cols``).
    inside : array_like of bool, shape (N,)
        :attr:`Acquired.inside`.
    keep : {"inside", "all"}
        Drop the columns that left the recorded field, or keep them flagged.

    Returns
    -------
    ColumnLabels
    """
    if keep not in ("inside", "all"):
        raise ValueError(f"keep: expected 'inside' or 'all', got {keep!r}")
    r = np.asarray(to_numpy(rows), dtype=np.float64).ravel()
    c = np.asarray(to_numpy(cols), dtype=np.float64).ravel()
    ins = np.asarray(to_numpy(inside), dtype=bool).ravel()
    if not (r.shape == c.shape == ins.shape):
        raise ValueError(f"cols, inside: shapes {c.shape}, {ins.shape} differ from rows {r.shape}")
    index = np.flatnonzero(ins) if keep == "inside" else np.arange(r.size)
    fields = {}
    for name in _TABLE_FIELDS:
        value = table.get(name) if isinstance(table, dict) else getattr(table, name, None)
        if value is None:
            continue
        arr = np.asarray(to_numpy(value))
        if arr.shape[:1] != r.shape:
            raise ValueError(f"table.{name}: {arr.shape[0]} rows, positions have {r.size}")
        fields[name] = arr[index]
    return ColumnLabels(
        index=index.astype(np.int64), x=c[index], y=r[index], inside=ins[index], **fields
    )
