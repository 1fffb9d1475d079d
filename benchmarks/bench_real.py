"""Real images: read, FFT-calibrate and label every image of ``../shared/real/``.

A check anyone with the development data can rerun (skipped when ``../shared/real/`` is
absent: users do not have it). For every image it prints whether it was read, calibrated
and labelled, the pixel size along the fast and slow scan, the anisotropy and shear, the
quality figures of the labelling and the class fractions; then, per acquisition series
(files of one folder whose trailing numbers lie within 500 of each other: one microscope
session), the spread of the pixel size and of each class fraction, which should be tight.
Beside the network's fractions, every image also gets the network-free estimate of its
single and double chalcogen vacancies from the intensity histogram of all its chalcogen
lattice sites (:func:`simgen.experiment.populations.chalcogen_populations`): where the two
agree image by image, a spread within a series is in the images, not in the classifier.

The model is ``$SIMGEN_REAL_MODEL``, else ``runs/wse2`` (the WSe2 recipe of
docs/labelling.md). Without a model only reading and calibration are reported.

    python -m benchmarks.bench_real [MODEL]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "real"
DEFAULT_MODEL = Path("runs/wse2")
#: Folder name -> material, for the data sets of ../shared/real/.
MATERIALS = {"wse2_80kV_adf": "WSe2"}


def series_of(paths: list[Path]) -> dict[str, list[Path]]:
    """Group files by folder and by runs of trailing numbers (gaps > 500 start a series)."""
    groups: dict[str, list[Path]] = {}
    by_folder: dict[Path, list[tuple[int, Path]]] = {}
    for p in paths:
        m = re.search(r"(\d+)$", p.stem)
        by_folder.setdefault(p.parent, []).append((int(m.group(1)) if m else 0, p))
    for folder, items in by_folder.items():
        items.sort()
        start, last, current = None, None, []
        for number, p in items:
            if last is not None and number - last > 500:
                groups[f"{folder.name}/{start}-{last}"] = current
                current, start = [], None
            start = number if start is None else start
            current.append(p)
            last = number
        if current:
            groups[f"{folder.name}/{start}-{last}"] = current
    return groups


def _spread(values: list[float]) -> str:
    import numpy as np

    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return "n/a"
    mean = float(v.mean())
    rel = (v.max() - v.min()) / mean if mean else float("nan")
    factor = f", max/min x{v.max() / v.min():.2f}" if v.min() > 0 else ""
    return f"{mean:.4g} (min {v.min():.4g}, max {v.max():.4g}, range {rel:.1%}{factor})"


def main(model: str | None = None) -> None:
    print("\n== Real images (../shared/real/): read, FFT-calibrate, label")
    files = sorted(p for p in REAL.glob("*/*") if p.suffix.lower() in (".tif", ".tiff", ".dm4"))
    if not files:
        print("   skipped: ../shared/real/ is absent (development data, not shipped)")
        return
    from simgen.experiment.readers import ReaderError, read_image

    model = model or os.environ.get("SIMGEN_REAL_MODEL") or DEFAULT_MODEL
    model = Path(model) if Path(model).exists() else None
    if model is None:
        print("   no model (runs/wse2 or $SIMGEN_REAL_MODEL): reading and calibration only;")
        print("   train one with the WSe2 recipe of docs/labelling.md to label")
    ensemble = None
    if model is not None:
        import torch

        from training.predict import Ensemble

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        ensemble = Ensemble.load(model, "cpu")
        print(f"   model: {model}")
    rows = []
    out = Path(tempfile.mkdtemp(prefix="bench_real_"))
    head = (
        f"   {'image':<24} {'read':>4} {'cal':>4} {'lab':>4} {'p_x Å':>7} {'p_y Å':>7} "
        f"{'aniso':>6} {'shear':>6} {'honey':>6} {'found':>6} {'offl':>6} {'M/X':>5} "
        f"{'lowc':>5} {'hX1':>5} {'hX2':>5} verdict  classes"
    )
    print(head)
    for path in files:
        material = MATERIALS.get(path.parent.name)
        row = {"path": path, "read": False, "cal": False, "lab": False}
        t0 = time.perf_counter()
        try:
            (im,) = read_image(path, material=material, sum_frames=True)
            row["read"], row["cal"] = True, im.lattice is not None
            cal = im.lattice
            row.update(p_x=cal.pixel_size_x_A, p_y=cal.pixel_size_y_A, aniso=cal.anisotropy,
                       shear=cal.shear)  # fmt: skip
        except ReaderError as err:
            row["error"] = str(err)
        if row["cal"] and material:
            from simgen.experiment.populations import chalcogen_populations

            try:
                pops = chalcogen_populations(im.data, im.pixel_size_A, material)
                row["hist_vac_X1"], row["hist_vac_X2"] = pops.single, pops.empty
            except ValueError as err:  # MatchError included: no lattice without a network
                row["hist_error"] = str(err)
        if row["cal"] and ensemble is not None:
            from training.experiments.label import label_image, write_outputs

            try:
                res = label_image(im, ensemble, material=material, tta=False)
                write_outputs(res, out / path.stem.replace(" ", "_"))
                row["lab"] = True
                row["quality"] = res.summary["quality"]
                row["classes"] = {
                    k: v["per_site"] for k, v in res.summary["classes"].items() if v["count"]
                }
            except ValueError as err:
                row["error"] = str(err)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        _print_row(row)
    print(f"   outputs (overlays, summaries): {out}")
    print("\n   per series (same microscope session: should agree)")
    for name, paths in series_of(files).items():
        sel = [r for r in rows if r["path"] in paths]
        print(f"   {name}: {len(sel)} images")
        print(
            f"     fast-scan pixel size [Å]: {_spread([r.get('p_x', float('nan')) for r in sel])}"
        )
        print(
            f"     slow-scan pixel size [Å]: {_spread([r.get('p_y', float('nan')) for r in sel])}"
        )
        for key in ("hist_vac_X1", "hist_vac_X2"):
            print(f"     {key} (histogram): {_spread([r.get(key, float('nan')) for r in sel])}")
        labelled = [r for r in sel if r["lab"]]
        if labelled:
            q = [r["quality"] for r in labelled]
            print(
                f"     honeycomb consistency:    {_spread([x['honeycomb_consistency'] for x in q])}"
            )
            print(
                f"     M/X contrast:             "
                f"{_spread([x['contrast_metal_chalcogen'] for x in q])}"
            )
            names = sorted({k for r in labelled for k in r["classes"]})
            for k in names:
                fr = [r["classes"].get(k, 0.0) for r in labelled]
                print(f"     fraction {k:<16} {_spread(fr)}")
    _agreement(rows)


def _agreement(rows) -> None:
    """Network against histogram, image by image (single and double chalcogen vacancies)."""
    import numpy as np

    for net, hist in (("vac_X1", "hist_vac_X1"), ("vac_X2", "hist_vac_X2")):
        pairs = [(r["classes"].get(net, 0.0), r[hist]) for r in rows if r["lab"] and hist in r]
        if len(pairs) < 3:
            continue
        a, b = np.array(pairs).T
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        some = b >= 0.002  # a ratio to (almost) nothing says nothing
        ratio = f"{np.median(a[some] / b[some]):.2f}" if some.any() else "n/a"
        print(
            f"   {net}: network / histogram per image: median ratio {ratio} "
            f"({int(some.sum())} images with ≥ 0.2 %), median difference "
            f"{np.median(a - b):+.4f}, correlation {r:.2f} ({len(pairs)} images)"
        )


def _print_row(row) -> None:
    def f(key, spec):
        v = row.get(key)
        return format(v, spec) if isinstance(v, float) else "-"

    q = row.get("quality") or {}

    def g(key, spec=".3f"):
        v = q.get(key)
        return format(v, spec) if isinstance(v, float) and v == v else "-"

    classes = " ".join(
        f"{k}:{v:.3g}" for k, v in (row.get("classes") or {}).items() if k not in ("metal",
                                                                                     "chalcogen")
    )  # fmt: skip
    print(
        f"   {row['path'].name[-24:]:<24} {'yes' if row['read'] else 'NO':>4} "
        f"{'yes' if row['cal'] else 'NO':>4} {'yes' if row['lab'] else '-':>4} "
        f"{f('p_x', '.5f'):>7} {f('p_y', '.5f'):>7} {f('aniso', '+.3f'):>6} "
        f"{f('shear', '+.3f'):>6} {g('honeycomb_consistency'):>6} "
        f"{g('sites_detected_fraction'):>6} {g('off_lattice_fraction'):>6} "
        f"{g('contrast_metal_chalcogen', '.2f'):>5} {g('low_confidence_fraction', '.2f'):>5} "
        f"{f('hist_vac_X1', '.3f'):>5} {f('hist_vac_X2', '.3f'):>5} "
        f"{q.get('verdict', '-'):<8} {classes}"
        + (f"  [{row['error'][:120]}]" if row.get("error") else "")
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
