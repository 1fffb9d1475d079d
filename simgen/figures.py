"""Write one PNG per acquisition stage (the pictures of docs/acquisition.md).

Run from the repository root::

    .venv/bin/simgen figures -o docs/images            # -> docs/images/acq_*.png
    .venv/bin/simgen figures -o /tmp/figs --seed 3

The input is a rendered 2H-MX2 lattice (:func:`simgen.check.synthetic_lattice`, 512² at
0.2 Å), so the figures need no simulation engine; the settings exaggerate each effect a
little so it is visible. PNGs are written with matplotlib's Agg backend and reduced to a
64-colour palette (each well under 150 kB). ``simgen figures`` calls :func:`make_figures`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FIGURE_CONFIG = {
    "drift": {
        "vx_A_per_s": 0.3,
        "vy_A_per_s": -0.25,
        "nonlinear_A": 0.12,
        "nonlinear_time_s": 0.4,
    },
    "jitter": {"line_x_A": 0.08},
    "current": {"drift_rel": 0.06, "drift_time_s": 1.0, "line_rel": 0.02},
    "contamination": {
        "rel": 0.5,
        "cutoff_A": 25.0,
        "exponent": 2.5,
        "blob_density_per_nm2": 0.03,
        "blob_radius_A": 9.0,
        "blob_rel": 0.8,
    },
    "shot": {"mode": "lambda", "lambda_counts": 12.0},
    "detector": {"read_noise": 0.5, "gain": 4.0, "offset": 10.0, "bits": 8},
}

ZOOM = (slice(200, 296), slice(240, 336))  # 96² px = 19 Å


def _save(fig, path: Path) -> None:
    from PIL import Image

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    img = Image.fromarray(rgba[..., :3]).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)


# Kept as one function (~125 lines): a flat script, one block per figure of
# docs/acquisition.md in the order of the page; there is no logic to share between blocks.
def make_figures(out_dir: str | Path = "docs/images", *, seed: int = 0) -> list[Path]:
    """Render the chain's stages on a test lattice and write one PNG per stage.

    Parameters
    ----------
    out_dir : str or Path
        Folder for the PNGs (created).
    seed : int
        Seed of the acquisition draw.

    Returns
    -------
    list of Path
        The files written: ``acq_0_ideal.png`` … ``acq_6_labels.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simgen.acquisition import AcquisitionConfig, apply_acquisition, required_padding_px
    from simgen.check import check_labels, synthetic_lattice
    from simgen.labels import class_mask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p, size = 0.2, 512
    cfg = AcquisitionConfig.from_dict(FIGURE_CONFIG)
    pad = required_padding_px(cfg, (size, size), p)
    lat = synthetic_lattice((size + 2 * pad,) * 2, pixel_size_A=p, rotation_deg=7.0)
    acq = apply_acquisition(
        lat.image, lat.rows, lat.cols, cfg, pad=pad, pixel_size_A=p, rng=seed, keep_stages=True
    )
    st = acq.stages
    prm = acq.params
    ext_full = (0, size * p / 10, size * p / 10, 0)  # nm
    zr, zc = ZOOM
    ext_zoom = (zc.start * p, zc.stop * p, zr.stop * p, zr.start * p)  # Å
    inside = acq.inside
    zsel = (
        inside
        & (acq.rows >= zr.start - 0.5)
        & (acq.rows < zr.stop - 0.5)
        & (acq.cols >= zc.start - 0.5)
        & (acq.cols < zc.stop - 0.5)
    )

    def panel(ax, img, title, *, zoom=False, cmap="gray", bar=None):
        im = ax.imshow(img[ZOOM] if zoom else img, cmap=cmap, extent=ext_zoom if zoom else ext_full)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("x [Å]" if zoom else "x [nm]", fontsize=7)
        ax.set_ylabel("y [Å]" if zoom else "y [nm]", fontsize=7)
        if bar:
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=6)
            cb.set_label(bar, fontsize=7)
        return im

    def labels_on(ax, color="tab:red"):
        ax.plot(acq.cols[zsel] * p, acq.rows[zsel] * p, "+", color=color, ms=4, mew=0.8)

    written = []

    def finish(name):
        fig.tight_layout()
        path = out / f"acq_{name}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)

    # 0 ideal
    fig, axs = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    panel(axs[0], st["ideal"], "0 ideal image (rendered lattice)")
    panel(axs[1], st["ideal"], "zoom", zoom=True)
    finish("0_ideal")

    # 1 contamination
    fig, axs = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    bg = st["contamination"] - st["ideal"]
    panel(
        axs[0],
        bg,
        f"1 contamination: rms {prm['contamination_rel']:.2f}× lattice,\n"
        f"cut-off {prm['contamination_cutoff_A']:.0f} Å, {int(prm['contamination_n_blobs'])} blobs",
        cmap="magma",
    )
    panel(axs[1], st["contamination"], "ideal + contamination (zoom)", zoom=True)
    finish("1_contamination")

    # 2 scan distortion
    fig, axs = plt.subplots(1, 3, figsize=(9.0, 3.0), dpi=100)
    m = acq.mapping
    panel(axs[0], m.dx_px * p, "2 scan: probe shift x", cmap="RdBu_r", bar="Å")
    panel(axs[1], m.dy_px * p, "probe shift y", cmap="RdBu_r", bar="Å")
    panel(axs[2], st["scan"], "recorded (noise-free) + labels", zoom=True)
    labels_on(axs[2])
    finish("2_scan")

    # 3 probe current
    fig, axs = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    ratio = st["current"] / np.where(st["scan"] != 0, st["scan"], 1)
    panel(axs[0], ratio, "3 probe current: relative current", cmap="viridis", bar="I / I0")
    panel(axs[1], st["current"], "noise-free recorded image (zoom)", zoom=True)
    finish("3_current")

    # 4 shot noise
    fig, axs = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    panel(axs[0], st["shot"], f"4 shot noise: λ = {prm['shot_mean_counts']:.0f} counts at mean")
    panel(axs[1], st["shot"], "counts (zoom)", zoom=True)
    finish("4_shot")

    # 5 detector
    fig, axs = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    panel(
        axs[0],
        st["detector"],
        f"5 detector: read noise {prm['detector_read_noise']:.1f} counts, "
        f"gain {prm['detector_gain']:.0f}, 8 bit",
    )
    panel(axs[1], st["detector"], "recorded image (zoom)", zoom=True)
    finish("5_detector")

    # 6 labels
    fig, axs = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    mask = class_mask(
        acq.rows, acq.cols, lat.site.astype(np.int64) + 1, (size, size), radius_px=3.5
    )
    report = check_labels(acq.noise_free, acq.rows[inside], acq.cols[inside])
    panel(axs[0], st["detector"], "6 labels: recorded image + column table", zoom=True)
    labels_on(axs[0], color="yellow")
    panel(axs[1], mask, "class mask (1 metal, 2 chalcogen)", zoom=True, cmap="viridis")
    fig.suptitle(
        f"label ↔ noise-free maxima: median {report.median_px:.2f} px, "
        f"p99 {report.p99_px:.2f} px, max {report.max_px:.2f} px",
        fontsize=8,
    )
    finish("6_labels")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in make_figures(args.out, seed=args.seed):
        print(f"{path}  {path.stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
