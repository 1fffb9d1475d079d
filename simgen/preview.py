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


def store_preview(root, output: str | Path, *, count: int = 6) -> Path:
    """Write a PNG montage: for ``count`` complete samples, the image with the mask
    overlaid and the labelled columns marked, plus a legend of the classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    done = list(store_mod.iter_complete(root))
    if not done:
        raise ValueError("the store holds no complete sample yet")
    chosen = done[: max(1, count)]
    names = root.attrs["label_scheme"]["names"]
    colors = class_colors(len(names))
    ncol = min(3, len(chosen))
    nrow = int(np.ceil(len(chosen) / ncol))
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(4.0 * ncol, 4.0 * nrow + 0.9), squeeze=False, layout="constrained"
    )
    present = set()
    for ax, i in zip(axes.ravel(), chosen, strict=False):
        image = np.asarray(root["images"][i])
        mask = np.asarray(root["masks"][i])
        cols = store_mod.read_columns(root, i)
        lo, hi = np.percentile(image, [0.5, 99.5])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        overlay = colors[mask]
        overlay[..., 3] = np.where(mask > 0, 0.22, 0.0)
        ax.imshow(overlay, interpolation="nearest")
        defect = cols["class_id"] > 2 if len(names) > 3 else np.zeros(len(cols["x"]), bool)
        for cid in np.unique(cols["class_id"]):
            sel = (cols["class_id"] == cid) & defect
            if sel.any():
                ax.scatter(
                    cols["x"][sel],
                    cols["y"][sel],
                    s=40,
                    facecolors="none",
                    edgecolors=[colors[cid]],
                    linewidths=1.2,
                )
        present.update(int(c) for c in np.unique(mask))
        present.update(int(c) for c in np.unique(cols["class_id"]) if c >= 0)
        ax.set_title(f"sample {i}", fontsize=9)
        ax.set_axis_off()
    for ax in axes.ravel()[len(chosen) :]:
        ax.set_axis_off()
    handles = [Patch(color=colors[c], label=f"{c}: {names[c]}") for c in sorted(present) if c > 0]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(6, max(1, len(handles))),
        fontsize=8,
        frameon=False,
    )
    px = root.attrs.get("pixel_size_A")
    fig.suptitle(
        f"{len(done)}/{root.attrs['n_samples']} samples, {px} Å/px — shaded: class "
        "mask; circles: defect columns",
        fontsize=10,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
