"""Pictures of a store: a montage of images with label overlays and a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simgen import store as store_mod


def class_colors(n: int) -> np.ndarray:
    """Distinct RGBA colours for classes 1..n-1 (class 0, background, transparent)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if n > 11 else "tab10"]
    colors = np.array([cmap(i % cmap.N) for i in range(n)])
    colors[0] = (0, 0, 0, 0)
    return colors


def preview_figure(root, *, count: int = 6):
    """The montage of :func:`store_preview` as a matplotlib ``Figure`` (Agg canvas, no
    pyplot): ``count`` complete samples with the mask overlaid and the defect columns
    circled, and a legend of the classes in a band of its own below the images (it grows
    with the number of classes, so it never covers an image)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from structures import LabelScheme, defect_classes

    done = list(store_mod.iter_complete(root))
    if not done:
        raise ValueError("the store holds no complete sample yet")
    if root.attrs.get("movie"):  # frames spread over the movie
        picks = np.unique(np.linspace(0, len(done) - 1, max(1, count)).round().astype(int))
        chosen = [done[k] for k in picks]
    else:
        chosen = done[: max(1, count)]
    scheme = LabelScheme.from_dict(root.attrs["label_scheme"])
    names = scheme.class_names
    defect_ids = [names.index(n) for n in defect_classes(names)]
    colors = class_colors(len(names))
    ncol = min(3, len(chosen))
    nrow = int(np.ceil(len(chosen) / ncol))
    present = set()
    for i in chosen:
        present.update(int(c) for c in np.unique(store_mod.read_mask(root, i)))
        present.update(int(c) for c in store_mod.read_columns(root, i)["class_id"] if c >= 0)
    handles = [Patch(color=colors[c], label=f"{c}: {names[c]}") for c in sorted(present) if c > 0]
    legend_cols = min(4, max(1, len(handles)))
    legend_rows = int(np.ceil(len(handles) / legend_cols))
    fig = Figure(figsize=(4.0 * ncol, 4.0 * nrow + 0.5 + 0.22 * legend_rows), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, i in zip(axes.ravel(), chosen, strict=False):
        _draw_sample(ax, root, i, colors, defect_ids)
    for ax in axes.ravel()[len(chosen) :]:
        ax.set_axis_off()
    if handles:
        # "outside": constrained layout reserves a band for the legend below the axes
        fig.legend(
            handles=handles, loc="outside lower center", ncol=legend_cols, fontsize=8,
            frameon=False,
        )  # fmt: skip
    px = root.attrs.get("pixel_size_A")
    fig.suptitle(
        f"{len(done)}/{root.attrs['n_samples']} samples, {px} Å/px — shaded: class "
        "mask; circles: defect columns",
        fontsize=10,
    )
    return fig


def _draw_sample(ax, root, i: int, colors, defect_ids) -> None:
    image = store_mod.read_image(root, i)
    mask = store_mod.read_mask(root, i)
    cols = store_mod.read_columns(root, i)
    lo, hi = np.percentile(image, [0.5, 99.5])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    overlay = colors[mask]
    overlay[..., 3] = np.where(mask > 0, 0.22, 0.0)
    ax.imshow(overlay, interpolation="nearest")
    for cid in np.unique(cols["class_id"]):
        sel = cols["class_id"] == cid
        if int(cid) in defect_ids and sel.any():
            ax.scatter(
                cols["x"][sel],
                cols["y"][sel],
                s=40,
                facecolors="none",
                edgecolors=[colors[cid]],
                linewidths=1.2,
            )
    what = "frame" if root.attrs.get("movie") else "sample"
    ax.set_title(f"{what} {i}", fontsize=9)
    ax.set_axis_off()


def store_preview(root, output: str | Path, *, count: int = 6) -> Path:
    """Write a PNG montage of :func:`preview_figure`."""
    fig = preview_figure(root, count=count)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    return output
