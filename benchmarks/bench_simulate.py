"""Speed of the three image models, and of plain abTEM code doing the same job.

``main()`` prints one table (speed figures, not pass/fail) for a defective MoS2 monolayer
rotated by 12° at 0.2 Å pixels, on the current device:

* ``incoherent``: whole 256² and 512² images (median over draws of the stem-learning
  optics at 30 mrad / 60–200 mrad), one calibration excepted (timed separately);
* ``prism`` (interpolation 2) and ``multislice``: a full image is out of reach on a CPU,
  so one 48×48-pixel tile of the same structure (window + probe padding, non-periodic) is
  simulated and the cost is extrapolated linearly in the number of tiles
  (``(N / 48)²``); multislice times a few probe positions of that tile and extrapolates
  per position. Extrapolated rows say so.
* ``plain abTEM``: the hand-written loop a user would write for the same tile
  (``Potential`` → ``SMatrix.scan`` / ``Probe.scan`` with an ``AnnularDetector``,
  ``.compute()``), measured in the same run; ``simgen / plain`` is the overhead ratio.

On two CPU cores it runs in about three minutes.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

P = 0.2  # pixel size [Å]


def _sync(image) -> None:
    sync = getattr(image, "device", None)
    if sync is not None and hasattr(sync, "synchronize"):  # pragma: no cover - GPU only
        sync.synchronize()


def _structure(fov_A: float, rng: int = 0):
    from structures import apply_defects, build_monolayer, column_table

    ml = build_monolayer("MoS2", fov=(fov_A, fov_A), rotation_deg=12.0, margin=8.0, rng=rng)
    ml = apply_defects(ml, {"vac_X1": 0.04, "vac_X2": 0.01, "vac_M": 0.01}, rng=rng + 1)
    return ml, column_table(ml)


def _crop(atoms, lo, hi):
    """The atoms a hand-written script would cut out for one tile (window + padding)."""
    from ase import Atoms

    pos = atoms.positions
    keep = (pos[:, 0] >= lo[0]) & (pos[:, 0] < hi[0]) & (pos[:, 1] >= lo[1]) & (pos[:, 1] < hi[1])
    return Atoms(
        numbers=atoms.numbers[keep],
        positions=pos[keep] - (lo[0], lo[1], 0.0),
        cell=[hi[0] - lo[0], hi[1] - lo[1], atoms.cell[2, 2]],
        pbc=True,
    )


def _plain_abtem(atoms, window, model, positions=None, device="cpu"):
    """Plain abTEM for one tile: the seconds it takes, as a user would write it."""
    import abtem

    from simgen.optics import optics_values, probe_radius_A

    x0, y0, n = window
    pad = probe_radius_A(optics_values({}))
    tile = _crop(atoms, (x0 - pad, y0 - pad), (x0 + n * P + pad, y0 + n * P + pad))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="abtem")
        potential = abtem.Potential(tile, sampling=0.05, slice_thickness=1.0, device=device)
        detector = abtem.AnnularDetector(inner=60, outer=200)
        if positions is None:
            scan = abtem.GridScan(start=(pad, pad), end=(pad + n * P, pad + n * P), sampling=P)
        else:
            scan = abtem.CustomScan(np.asarray(positions) + pad)
        if model == "prism":
            sm = abtem.SMatrix(
                potential=potential, energy=80e3, semiangle_cutoff=30, interpolation=2,
                device=device,
            )  # fmt: skip
            sm.scan(scan=scan, detectors=detector).compute(progress_bar=False)
        else:
            probe = abtem.Probe(energy=80e3, semiangle_cutoff=30, device=device)
            probe.scan(potential, scan=scan, detectors=detector).compute(progress_bar=False)
    return time.perf_counter() - t0


def main(
    device: str = "auto",
    sizes: tuple[int, ...] = (256, 512),
    tile_px: int = 48,
    multislice_positions: int = 4,
    repeats: int = 10,
) -> list[dict]:
    """Time the models and print the table.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"}
        Where to run.
    sizes : tuple of int
        Image sides [px] for the incoherent model and the extrapolations.
    tile_px : int
        Side of the PRISM / multislice tile [px].
    multislice_positions : int
        Probe positions timed for multislice.
    repeats : int
        Incoherent images timed per size (median reported) after one warm-up.

    Returns
    -------
    list of dict
        One row per line of the table: ``model``, ``size``, ``seconds`` (per image),
        ``images_per_s``, ``how`` and, where measured, ``plain_seconds`` and ``ratio``.
    """
    from simgen.backend import resolve_device
    from simgen.calibrate import calibrate
    from simgen.optics import OpticsConfig
    from simgen.simulation import simulate

    dev = resolve_device(device)
    rows: list[dict] = []
    t0 = time.perf_counter()
    cal = calibrate(None, ("Mo", "S"), device=dev)
    t_cal = time.perf_counter() - t0
    cfg = OpticsConfig.stem_learning().replace(
        semiangle_mrad=30.0, haadf_inner_mrad=60.0, pixel_size_A=P
    )
    big = max(sizes)
    ml, table = _structure(big * P + 2.0)
    x0, y0 = ml.fov_origin

    # -- incoherent: whole images ----------------------------------------------------------
    inc_seconds = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        kw = {"calibration": cal, "shape": (n, n), "origin": (x0, y0), "device": dev}
        _sync(simulate(ml.atoms, table, cfg.draw(rng), **kw).image)  # warm-up
        times = []
        for _ in range(repeats):
            optics = cfg.draw(rng)
            t = time.perf_counter()
            _sync(simulate(ml.atoms, table, optics, **kw).image)
            times.append(time.perf_counter() - t)
        s = float(np.median(times))
        inc_seconds[n] = s
        rows.append({"model": "incoherent", "size": n, "seconds": s, "how": "measured"})

    # -- one tile with every model -------------------------------------------------------------
    tx0, ty0 = x0 + 0.5 * big * P - 0.5 * tile_px * P, y0 + 0.5 * big * P - 0.5 * tile_px * P
    tile_kw = {"shape": (tile_px, tile_px), "origin": (tx0, ty0), "device": dev}
    optics = {"source_size_A": 0.0}
    t = time.perf_counter()
    _sync(simulate(ml.atoms, table, optics, calibration=cal, **tile_kw).image)
    t_inc_tile = time.perf_counter() - t
    t = time.perf_counter()
    _sync(simulate(ml.atoms, table, optics, model="prism", interpolation=2, **tile_kw).image)
    t_prism_tile = time.perf_counter() - t
    plain_prism = _plain_abtem(ml.atoms, (tx0, ty0, tile_px), "prism", device=dev)
    k = multislice_positions
    ms_kw = {**tile_kw, "shape": (1, k)}
    t = time.perf_counter()
    _sync(simulate(ml.atoms, table, optics, model="multislice", **ms_kw).image)
    t_ms = time.perf_counter() - t
    pos = [(c * P, 0.5 * tile_px * P) for c in range(k)]
    plain_ms = _plain_abtem(ml.atoms, (tx0, ty0, tile_px), "multislice", pos, device=dev)
    rows.append(
        {"model": "incoherent", "size": tile_px, "seconds": t_inc_tile, "how": "measured (tile)"}
    )
    rows.append(
        {
            "model": "prism",
            "size": tile_px,
            "seconds": t_prism_tile,
            "how": "measured (tile, f=2)",
            "plain_seconds": plain_prism,
        }
    )
    for n in sizes:
        tiles = (n / tile_px) ** 2
        rows.append(
            {
                "model": "prism",
                "size": n,
                "seconds": t_prism_tile * tiles,
                "how": f"extrapolated: {tiles:.1f} tiles",
                "plain_seconds": plain_prism * tiles,
            }
        )
    per_pos, plain_per_pos = t_ms / k, plain_ms / k
    for n in (tile_px, *sizes):
        rows.append(
            {
                "model": "multislice",
                "size": n,
                "seconds": per_pos * n * n,
                "how": f"extrapolated: {k} positions timed",
                "plain_seconds": plain_per_pos * n * n,
            }
        )
    for row in rows:
        row["images_per_s"] = 1.0 / row["seconds"]
        if "plain_seconds" in row:
            row["ratio"] = row["seconds"] / row["plain_seconds"]

    # -- print ----------------------------------------------------------------------------------
    print(f"\n== bench_simulate: MoS2, 12° rotation, {P} Å pixels, device {dev}")
    print(f"   calibration (PRISM reference, once per optics/elements): {t_cal:.1f} s")
    head = f"{'model':<11} {'size':>6} {'s/image':>11} {'images/s':>10} "
    head += f"{'plain abTEM s':>14} {'simgen/plain':>13}  how"
    print(head)
    print("-" * len(head))
    for r in rows:
        plain = f"{r['plain_seconds']:14.4g}" if "plain_seconds" in r else " " * 14
        ratio = f"{r['ratio']:13.2f}" if "ratio" in r else " " * 13
        print(
            f"{r['model']:<11} {r['size']:>4}² {r['seconds']:11.4g} {r['images_per_s']:10.4g} "
            f"{plain} {ratio}  {r['how']}"
        )
    for n in sizes:
        prism = next(r for r in rows if r["model"] == "prism" and r["size"] == n)
        print(
            f"   incoherent speed-up over PRISM at {n}²: {prism['seconds'] / inc_seconds[n]:,.0f}x"
        )
    print(
        f"   same {tile_px}² tile, both measured: incoherent {t_inc_tile * 1e3:.1f} ms, "
        f"PRISM {t_prism_tile:.1f} s: {t_prism_tile / t_inc_tile:,.0f}x"
    )
    if math.isfinite(t_cal):
        print("   (incoherent rows exclude the one-off calibration)")
    return rows


if __name__ == "__main__":
    main()
