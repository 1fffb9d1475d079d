"""``simgen match`` on every real image of ``../shared/real/`` (skipped when absent).

For each image: its contrast and noise level beside those of images simulated from the
config matched to it (``simgen match`` with the shipped WSe2+V base, 256² tiles), and the
matched values; then per acquisition series (as :mod:`benchmarks.bench_real` groups them)
the range of each matched value, to show the two series get different configs.

    python -m benchmarks.bench_match [N_CHECK]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.bench_real import MATERIALS, REAL, series_of

#: Matched values printed per image and per series.
SHOWN = (
    "inner_mrad",
    "gamma",
    "lambda_counts",
    "smoothing_px",
    "source_size_A",
    "stretch_low_percent",
    "line_jitter_A",
    "contamination_rel",
)


def main(n_check: int = 6) -> list:
    from simgen.api import cached_calibration
    from simgen.config import load_config
    from simgen.experiment.readers import read_image
    from simgen.incoherent import calibration_from_dict
    from simgen.match import match, measure_tiles
    from simgen.pipeline import calibration_request

    folders = [f for f in sorted(REAL.glob("*")) if f.is_dir() and f.name in MATERIALS]
    if not folders:
        print("\n== simgen match on real images: ../shared/real/ not present, skipped")
        return []
    rows = []
    for folder in folders:
        material = MATERIALS[folder.name]
        base = load_config().with_overrides(
            {"structure.material": material, "structure.dopant": "V"}
        )
        key, compute = calibration_request(
            base.with_overrides(
                {
                    "optics.haadf_inner_mrad": {"uniform": [40.0, 120.0]},
                    "optics.haadf_outer_mrad": {"uniform": [150.0, 250.0]},
                }
            )
        )
        grid = calibration_from_dict(cached_calibration(key, compute))
        files = sorted(folder.glob("*.tif"))
        for path in files:
            t0 = time.perf_counter()
            (im,) = read_image(path, material=material)
            target, _ = measure_tiles(im.data, im.pixel_size_A, material, base.dataset.image_size)
            lat = im.lattice
            result = match(
                target,
                base,
                grid,
                material=material,
                anisotropy=lat.anisotropy if lat is not None else float("nan"),
                shear=lat.shear if lat is not None else float("nan"),
                n_check=n_check,
            )
            rows.append((path, result, time.perf_counter() - t0))
    print(
        f"\n== simgen match on {len(rows)} real images (base: WSe2+V, 256² tiles, "
        f"{n_check} simulated images per round)"
    )
    print(
        f"{'image':<10} {'contrast img/sim':>17} {'diff':>6} {'noise img/sim':>15} {'diff':>6} "
        + " ".join(f"{n[:9]:>9}" for n in SHOWN)
        + f" {'s':>4}"
    )
    within = {"contrast": 0, "noise_level": 0}
    for path, r, seconds in rows:
        agree = r.agreement()
        c, n = agree["contrast"], agree["noise_level"]
        within["contrast"] += c[3]
        within["noise_level"] += n[3]
        values = r.matched.values()
        print(
            f"{path.stem[-8:]:<10} {c[0]:>8.3f}/{c[1]:<8.3f} {100 * c[2]:>+5.1f}% "
            f"{n[0]:>7.3f}/{n[1]:<7.3f} {100 * n[2]:>+5.1f}% "
            + " ".join(f"{values[k]:>9.3g}" for k in SHOWN)
            + f" {seconds:>4.0f}"
        )
    print(
        f"contrast within 5 %: {within['contrast']}/{len(rows)}; "
        f"noise level within 20 %: {within['noise_level']}/{len(rows)}"
    )
    by_path = {path: r for path, r, _ in rows}
    print("per series: range of the matched values")
    for name, paths in series_of([p for p, _, _ in rows]).items():
        vals = {k: [by_path[p].matched.values()[k] for p in paths] for k in SHOWN}
        print(
            f"  {name:<28} "
            + "  ".join(f"{k} {np.min(v):.3g}-{np.max(v):.3g}" for k, v in vals.items())
        )
    return rows


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
