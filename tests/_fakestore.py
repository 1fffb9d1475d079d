"""A tiny store written with plain zarr v3, following ``docs/store.md`` exactly.

Stand-in for simgen's writer in the training tests: images are Gaussian blobs on a
projected 2H lattice (metal columns brighter than chalcogen columns) with shot noise,
a few "defect" columns dimmer (``vac_X1``) or empty (``vac_X2``, ``vac_M``); masks are disks
of the column classes; ``columns/*`` hold the true positions in recorded-image pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

ELEMENTS = ["Mo", "S"]
#: Default scheme: ids 1..5 (0 = mask background, not listed).
SCHEME = {"ids": [1, 2, 3, 4, 5], "names": ["M", "X2", "vac_X1", "vac_X2", "vac_M"]}
#: (relative intensity, class name, site, n_atoms, counts)
KINDS = {
    "M": (1.0, 0, 1, (1, 0)),
    "X2": (0.6, 1, 2, (0, 2)),
    "vac_X1": (0.3, 1, 1, (0, 1)),
    "vac_X2": (0.0, 1, 0, (0, 0)),
    "vac_M": (0.0, 0, 0, (0, 0)),
}


def lattice_columns(shape, pixel_size_A, a_A, rng, defect_rate=0.08):
    """Projected 2H columns covering an image: positions [px], kind names.

    Parameters
    ----------
    shape : (int, int)
        Image ``(H, W)``.
    pixel_size_A : float
        Pixel size [Å].
    a_A : float
        Lattice constant [Å].
    rng : numpy.random.Generator
    defect_rate : float
        Probability that a column is a defect (vacancy of its sublattice).

    Returns
    -------
    x, y : ndarray
        Column positions in pixels (col = x, row = y).
    kinds : list of str
    """
    h, w = shape
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    a1 = rot @ np.array([a_A, 0.0])
    a2 = rot @ np.array([a_A / 2, a_A * math.sqrt(3) / 2])
    origin = rng.uniform(0, a_A, size=2)
    n = int(max(h, w) * pixel_size_A / a_A * 2) + 3
    ij = np.stack(np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1)), -1).reshape(-1, 2)
    base = origin + ij[:, :1] * a1 + ij[:, 1:] * a2
    xs, ys, kinds = [], [], []
    for offset, sub in ((np.zeros(2), "M"), ((a1 + a2) / 3, "X2")):
        p = (base + offset) / pixel_size_A
        inside = (p[:, 0] >= 0) & (p[:, 0] <= w - 1) & (p[:, 1] >= 0) & (p[:, 1] <= h - 1)
        p = p[inside]
        xs.append(p[:, 0])
        ys.append(p[:, 1])
        for _ in range(len(p)):
            if rng.random() < defect_rate:
                if sub == "M":
                    kinds.append("vac_M")
                else:
                    kinds.append("vac_X1" if rng.random() < 0.6 else "vac_X2")
            else:
                kinds.append(sub)
    return np.concatenate(xs), np.concatenate(ys), kinds


def render(shape, x, y, weights, sigma_px):
    """Sum of Gaussian blobs [relative units] (each evaluated within 5 sigma)."""
    h, w = shape
    img = np.zeros(shape)
    half = int(np.ceil(5 * sigma_px))
    for xi, yi, wi in zip(x, y, weights, strict=True):
        if wi <= 0:
            continue
        r0, r1 = max(int(yi) - half, 0), min(int(yi) + half + 2, h)
        c0, c1 = max(int(xi) - half, 0), min(int(xi) + half + 2, w)
        rows, cols = np.mgrid[r0:r1, c0:c1]
        img[r0:r1, c0:c1] += wi * np.exp(-((cols - xi) ** 2 + (rows - yi) ** 2) / (2 * sigma_px**2))
    return img


def disk_mask(shape, x, y, class_ids, radius_px):
    """Class-id mask with a disk per column (0 = background)."""
    h, w = shape
    mask = np.zeros(shape, np.uint8)
    half = int(np.ceil(radius_px)) + 1
    for xi, yi, c in zip(x, y, class_ids, strict=True):
        r0, r1 = max(int(yi) - half, 0), min(int(yi) + half + 2, h)
        c0, c1 = max(int(xi) - half, 0), min(int(xi) + half + 2, w)
        rows, cols = np.mgrid[r0:r1, c0:c1]
        mask[r0:r1, c0:c1][(cols - xi) ** 2 + (rows - yi) ** 2 <= radius_px**2] = c
    return mask


def write_fake_store(
    path,
    n_samples: int = 8,
    shape=(48, 48),
    *,
    seed: int = 0,
    pixel_size_A: float = 0.3,
    a_A: float = 3.2,
    dose: float | tuple[float, float] = 30.0,
    scheme: dict | None = None,
    schema_version: int = 1,
    incomplete=(),
    disk_radius_A: float = 0.5,
    sigma_A: float = 0.4,
    defect_rate: float = 0.08,
) -> Path:
    """Write a tiny labelled store following ``docs/store.md``.

    Parameters
    ----------
    path : path-like
        Store directory to create (overwritten).
    n_samples : int
        Number of samples ``N``.
    shape : (int, int)
        Image shape ``(H, W)``.
    seed : int
        Sample i uses ``default_rng([seed, i])``.
    pixel_size_A : float
        Pixel size [Å].
    a_A : float
        Lattice constant [Å].
    dose : float or (float, float)
        Poisson λ: expected counts per pixel at the image's mean intensity, or a range to
        draw it from uniformly per sample; 0 = no noise (relative units).
    scheme : dict, optional
        Label scheme ``{"ids", "names"}``; names must be keys of :data:`KINDS`.
    schema_version : int
        Written as the ``schema_version`` attribute.
    incomplete : iterable of int
        Samples left unwritten with ``complete = 0`` (as after a killed run).
    disk_radius_A : float
        Radius of the mask disks [Å].
    sigma_A : float
        Gaussian width of a column [Å].
    defect_rate : float
        Probability that a column is a vacancy.

    Returns
    -------
    pathlib.Path
    """
    scheme = SCHEME if scheme is None else scheme
    name_to_id = dict(zip(scheme["names"], scheme["ids"], strict=True))
    h, w = shape
    incomplete = set(incomplete)
    samples = []
    for i in range(n_samples):
        rng = np.random.default_rng([seed, i])
        x, y, kinds = lattice_columns(shape, pixel_size_A, a_A, rng, defect_rate)
        weights = np.array([KINDS[k][0] for k in kinds])
        ideal = 0.05 + render(shape, x, y, weights, sigma_A / pixel_size_A)
        lam = float(rng.uniform(*dose)) if isinstance(dose, tuple | list) else float(dose)
        if lam > 0:
            img = rng.poisson(lam * ideal / ideal.mean()).astype(np.float32)
        else:
            img = ideal.astype(np.float32)
        ids = np.array([name_to_id[k] for k in kinds], np.int16)
        mask = disk_mask(shape, x, y, ids, disk_radius_A / pixel_size_A)
        samples.append((img, mask, x, y, ids, kinds, rng.uniform(-10, 10), lam))
    cap = max(len(s[2]) for s in samples) + 4

    root = zarr.open_group(str(path), mode="w")

    def arr(group, name, shp, chunks, dtype):
        return group.create_array(name, shape=shp, chunks=chunks, dtype=dtype, fill_value=0)

    images = arr(root, "images", (n_samples, h, w), (1, h, w), "float32")
    masks = arr(root, "masks", (n_samples, h, w), (1, h, w), "uint8")
    complete = arr(root, "complete", (n_samples,), (1,), "uint8")
    cols = root.create_group("columns")
    nc = n_samples * cap
    cx = arr(cols, "x", (nc,), (cap,), "float32")
    cy = arr(cols, "y", (nc,), (cap,), "float32")
    cid = arr(cols, "class_id", (nc,), (cap,), "int16")
    csite = arr(cols, "site", (nc,), (cap,), "int8")
    cna = arr(cols, "n_atoms", (nc,), (cap,), "int8")
    ccounts = arr(cols, "counts", (nc, len(ELEMENTS)), (cap, len(ELEMENTS)), "uint8")
    offset = arr(cols, "offset", (n_samples,), (n_samples,), "int64")
    count = arr(cols, "count", (n_samples,), (1,), "int32")
    params = root.create_group("params")
    defocus = arr(params, "defocus_A", (n_samples,), (1,), "float64")
    dose_arr = arr(params, "dose", (n_samples,), (1,), "float64")
    offset[:] = np.arange(n_samples, dtype=np.int64) * cap
    for i, (img, mask, x, y, ids, kinds, df, lam) in enumerate(samples):
        if i in incomplete:
            continue
        images[i] = img
        masks[i] = mask
        o, n = i * cap, len(x)
        cx[o : o + n] = x
        cy[o : o + n] = y
        cid[o : o + n] = ids
        csite[o : o + n] = [KINDS[k][1] for k in kinds]
        cna[o : o + n] = [KINDS[k][2] for k in kinds]
        ccounts[o : o + n] = np.array([KINDS[k][3] for k in kinds], np.uint8)
        count[i] = n
        defocus[i] = df
        dose_arr[i] = lam
        complete[i] = 1
    root.attrs.update(
        {
            "schema_version": schema_version,
            "config": {
                "fake": True,
                "seed": seed,
                "dose": list(dose) if isinstance(dose, tuple | list) else dose,
                "labels": {"disk_radius_A": disk_radius_A},
            },
            "label_scheme": scheme,
            "pixel_size_A": pixel_size_A,
            "image_shape": [h, w],
            "n_samples": n_samples,
            "column_capacity": cap,
            "elements": ELEMENTS,
            "calibration": None,
            "versions": {"zarr": zarr.__version__, "numpy": np.__version__},
            "created": "2026-01-01T00:00:00",
        }
    )
    return Path(path)
