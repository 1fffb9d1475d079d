"""Pictures of a labelled experimental image: column overlay, class averages, defect density.

matplotlib's object API with the Agg canvas (no pyplot, no global backend change). Each
``*_png`` function writes one PNG; the array functions (:func:`class_averages`,
:func:`defect_density_map`) touch no file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _new_figure(width_in: float, height_in: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _display_range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _check_image(image) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image: expected a 2-D array [H, W], got shape {img.shape}")
    return img


def _spacing_px(catalogue) -> float:
    """Median nearest-neighbour distance of the catalogue's sites [px] (NaN if < 2)."""
    from scipy.spatial import cKDTree

    pts = catalogue.positions_px
    if len(pts) < 2:
        return float("nan")
    d, _ = cKDTree(pts).query(pts, k=2)
    return float(np.median(d[:, 1]))


def _class_colours(n_classes: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n_classes <= 11 else "tab20"]
    return [cmap((k - 1) % cmap.N) for k in range(n_classes)]


def overlay_png(
    image, catalogue, scheme, path, *, title: str | None = None, width_in: float | None = None
) -> Path:
    """Save the image with a coloured marker on every catalogue site and a legend.

    Filled markers are detected columns, open markers empty lattice sites; the legend gives
    each class's count.

    Parameters
    ----------
    image : array_like, shape (H, W)
    catalogue : training.experiments.catalogue.Catalogue
    scheme : str, mapping or label scheme
    path : path-like
        Output PNG.
    title : str, optional
    width_in : float, optional
        Width of the image panel [inches] at 100 dpi; default the image width in pixels
        / 100, between 4 and 8 (small images are not blown up).

    Returns
    -------
    pathlib.Path
    """
    from simgen.experiment.lattice import scheme_names

    img = _check_image(image)
    names = scheme_names(scheme)
    h, w = img.shape
    if width_in is None:
        width_in = float(np.clip(w / 100.0, 4.0, 8.0))
    fig = _new_figure(width_in + 2.2, width_in * h / w + 0.6)
    ax = fig.add_axes((0.02, 0.02, width_in / (width_in + 2.2) - 0.02, 0.92))
    vmin, vmax = _display_range(img)
    ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    display_per_px = width_in * 72.0 / w  # points per image pixel
    spacing = _spacing_px(catalogue)
    size_pt = 0.45 * (spacing if np.isfinite(spacing) else 6.0) * display_per_px
    size_pt = float(np.clip(size_pt, 1.5, 12.0))
    colours = _class_colours(len(names))
    cid, det = catalogue.class_id, catalogue.detected
    for k in range(1, len(names)):
        sel = cid == k
        n = int(sel.sum())
        if n == 0:
            continue
        on, off = sel & det, sel & ~det
        label = f"{names[k]} ({n})"
        if on.any():
            ax.plot(
                catalogue.x_px[on],
                catalogue.y_px[on],
                "o",
                ms=size_pt,
                mfc=colours[k],
                mec="none",
                alpha=0.8,
                label=label,
                linestyle="none",
            )
            label = None
        if off.any():
            ax.plot(
                catalogue.x_px[off],
                catalogue.y_px[off],
                "o",
                ms=size_pt * 1.3,
                mfc="none",
                mec=colours[k],
                mew=1.2,
                label=label,
                linestyle="none",
            )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="upper right", fontsize=8, frameon=False, markerscale=max(1.0, 6 / size_pt))
    path = Path(path)
    fig.savefig(path)
    return path


def class_averages(image, catalogue, scheme, patch_px: int | None = None) -> dict:
    """Mean image patch around the sites of each class (Lee et al.'s class averages).

    Patches are centred on the sub-pixel site positions (bilinear sampling); patches that
    leave the image are skipped.

    Parameters
    ----------
    image : array_like, shape (H, W)
    catalogue : training.experiments.catalogue.Catalogue
    scheme : str, mapping or label scheme
    patch_px : int, optional
        Patch side [px], made odd; default about three site spacings.

    Returns
    -------
    dict
        Class name -> ``(mean patch [patch_px, patch_px], number of patches)`` for every
        class with at least one complete patch.
    """
    from scipy import ndimage

    from simgen.experiment.lattice import scheme_names

    img = _check_image(image)
    names = scheme_names(scheme)
    h, w = img.shape
    if patch_px is None:
        spacing = _spacing_px(catalogue)
        patch_px = int(round(3.2 * spacing)) if np.isfinite(spacing) else 31
    patch_px = int(patch_px) | 1
    if patch_px < 3:
        raise ValueError(f"patch_px: expected >= 3, got {patch_px}")
    half = patch_px // 2
    offs = np.arange(-half, half + 1, dtype=np.float64)
    out = {}
    for k in range(1, len(names)):
        sel = catalogue.class_id == k
        x, y = catalogue.x_px[sel], catalogue.y_px[sel]
        inside = (x - half >= 0) & (x + half <= w - 1) & (y - half >= 0) & (y + half <= h - 1)
        x, y = x[inside], y[inside]
        if len(x) == 0:
            continue
        rows = y[:, None, None] + offs[None, :, None]
        cols = x[:, None, None] + offs[None, None, :]
        rows, cols = np.broadcast_arrays(rows, cols)
        patches = ndimage.map_coordinates(img, [rows.ravel(), cols.ravel()], order=1)
        out[names[k]] = (patches.reshape(len(x), patch_px, patch_px).mean(axis=0), len(x))
    return out


def class_averages_png(
    image, catalogue, scheme, path, patch_px: int | None = None, *, n_cols: int = 5
) -> Path:
    """Save the class-averaged patches (:func:`class_averages`) as a grid of panels.

    All panels share one grey scale, so intensities compare across classes; titles give the
    class and the number of patches averaged.

    Parameters
    ----------
    image : array_like, shape (H, W)
    catalogue : training.experiments.catalogue.Catalogue
    scheme : str, mapping or label scheme
    path : path-like
    patch_px : int, optional
        Patch side [px]; default about three site spacings (odd).
    n_cols : int
        Panels per row.

    Returns
    -------
    pathlib.Path
    """
    means = class_averages(image, catalogue, scheme, patch_px)
    n = max(len(means), 1)
    cols = min(n_cols, n)
    rows = int(np.ceil(n / cols))
    fig = _new_figure(1.8 * cols, 2.1 * rows)
    if not means:
        fig.text(0.5, 0.5, "no complete patches", ha="center", va="center")
    else:
        vmin = min(float(m.min()) for m, _ in means.values())
        vmax = max(float(m.max()) for m, _ in means.values())
        for i, (name, (m, count)) in enumerate(means.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(m, cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
            ax.set_title(f"{name}\nn={count}", fontsize=8)
            ax.set_axis_off()
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def defect_density_map(
    catalogue, image_shape, *, classes=None, scheme=None, sigma_A: float | None = None
) -> tuple[np.ndarray, float]:
    """Smoothed areal density of defect sites over the image [nm⁻²].

    Sites of the defect classes are histogrammed on a grid of about σ/3 and smoothed with a
    Gaussian of width ``sigma_A``, with the edge correction of dividing by the smoothed
    image support (so the density is not lowered near the border).

    Parameters
    ----------
    catalogue : training.experiments.catalogue.Catalogue
    image_shape : (H, W)
    classes : sequence of str, optional
        Default :func:`training.experiments.catalogue.defect_class_names` of ``scheme``.
    scheme : optional
        Needed when ``classes`` is not given.
    sigma_A : float, optional
        Smoothing length [Å]; default max(10 Å, one twentieth of the larger image side).

    Returns
    -------
    density : ndarray, shape (H, W)
        Defects per nm².
    sigma_A : float
    """
    from scipy import ndimage

    from training.experiments.catalogue import defect_class_names

    h, w = (int(v) for v in image_shape)
    p = catalogue.pixel_size_A
    if classes is None:
        if scheme is None:
            raise ValueError("give classes or scheme")
        classes = defect_class_names(scheme)
    ids = [catalogue.class_names.index(c) for c in classes if c in catalogue.class_names]
    if sigma_A is None:
        sigma_A = max(10.0, max(h, w) * p / 20.0)
    sigma_px = sigma_A / p
    step = max(1, int(sigma_px / 3))
    gh, gw = -(-h // step), -(-w // step)
    sel = np.isin(catalogue.class_id, ids)
    r = np.clip((catalogue.y_px[sel] / step).astype(np.int64), 0, gh - 1)
    c = np.clip((catalogue.x_px[sel] / step).astype(np.int64), 0, gw - 1)
    grid = np.zeros((gh, gw))
    np.add.at(grid, (r, c), 1.0)
    support = np.zeros((gh, gw))
    support[: h // step, : w // step] = 1.0  # full cells
    if h % step:
        support[h // step :, : w // step] = (h % step) / step
    if w % step:
        support[: h // step, w // step :] = (w % step) / step
    if h % step and w % step:
        support[h // step :, w // step :] = (h % step) * (w % step) / step**2
    s = sigma_px / step
    num = ndimage.gaussian_filter(grid, s, mode="constant")
    den = ndimage.gaussian_filter(support, s, mode="constant")
    cell_nm2 = (step * p) ** 2 / 100.0
    dens = np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0) / cell_nm2
    if step == 1:
        return dens, float(sigma_A)
    rr = (np.arange(h) + 0.5) / step - 0.5  # pixel centres in grid-cell units
    cc = (np.arange(w) + 0.5) / step - 0.5
    rows, cols = np.meshgrid(rr, cc, indexing="ij")
    full = ndimage.map_coordinates(dens, [rows, cols], order=1, mode="nearest")
    return np.maximum(full, 0.0), float(sigma_A)


def defect_density_png(
    image,
    catalogue,
    scheme,
    path,
    *,
    classes=None,
    sigma_A: float | None = None,
    width_in: float = 6.0,
) -> Path:
    """Save the image overlaid with the smoothed spatial density of defects.

    Parameters
    ----------
    image : array_like, shape (H, W)
    catalogue : training.experiments.catalogue.Catalogue
    scheme : str, mapping or label scheme
    path : path-like
    classes : sequence of str, optional
        Defect classes (default :func:`training.experiments.catalogue.defect_class_names`).
    sigma_A : float, optional
        Smoothing length [Å] (see :func:`defect_density_map`).
    width_in : float

    Returns
    -------
    pathlib.Path
    """
    from training.experiments.catalogue import defect_class_names

    img = _check_image(image)
    h, w = img.shape
    if classes is None:
        classes = defect_class_names(scheme)
    dens, sigma_A = defect_density_map(catalogue, img.shape, classes=classes, sigma_A=sigma_A)
    ids = [catalogue.class_names.index(c) for c in classes if c in catalogue.class_names]
    sel = np.isin(catalogue.class_id, ids)
    n = int(sel.sum())
    area_nm2 = h * w * catalogue.pixel_size_A**2 / 100.0
    fig = _new_figure(width_in + 1.3, width_in * h / w + 0.7)
    ax = fig.add_axes((0.03, 0.04, width_in / (width_in + 1.3) - 0.03, 0.86))
    vmin, vmax = _display_range(img)
    ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    top = float(dens.max()) if dens.max() > 0 else 1.0
    im = ax.imshow(dens, cmap="magma", alpha=0.55, vmin=0.0, vmax=top)
    if n:
        ax.plot(catalogue.x_px[sel], catalogue.y_px[sel], ".", ms=2, color="cyan", alpha=0.7)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(
        f"{n} defects, {n / area_nm2 * 1e14:.3g} cm$^{{-2}}$ (σ = {sigma_A:.0f} Å)", fontsize=9
    )
    cax = fig.add_axes((width_in / (width_in + 1.3) + 0.02, 0.1, 0.03, 0.74))
    fig.colorbar(im, cax=cax, label="defects per nm$^2$")
    path = Path(path)
    fig.savefig(path)
    return path
