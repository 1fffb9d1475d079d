"""Convergence of the reference simulations, and the calibrated incoherent model against them.

``main()`` prints (figures, not pass/fail):

1. **Lone atoms** (S, Se, Te, V, Mo, Re, W; 80 kV, 30 mrad, 60–200 mrad, ideal probe): the
   HAADF of a probe on the atom at six sub-pixel positions (a node and places off the
   nodes of the supersampled grids), for abTEM's plain potential (infinite and finite
   projection) at 0.05, 0.025 and 0.0125 Å, and for simgen's supersampled transmission
   function (wave grid 0.05 Å, potential ×2, ×4, ×8). Columns: spread over the
   positions (max − min over mean) and the mean's deviation from the converged value
   (0.0125 Å waves, potential ×4 = 0.003 Å).
2. **Slice thickness** at the defaults: a lone W atom and an Se2 column at 1, 0.5,
   0.25 Å slices.
3. **PRISM interpolation**: f = 2 against f = 1 on a periodic WSe2 cell.
4. **Incoherent model against the converged reference** (PRISM f = 1 at the defaults,
   i.e. potential 0.0125 Å): a WSe2 cell holding V dopants, SeTe and Te2 substitutions,
   single (entrance/exit side) and double Se vacancies and a W vacancy at 80 kV, and a
   MoS2 cell at 60 kV, at defocus 0 and ±30 Å. Per class the column-centre value ratio
   (model / reference − 1) of M/X2, X1/X2, dopant/M, sub/full, vacancy site/hollow,
   and the image correlation. The calibration is computed here, as ``simgen`` would
   (the test cells are not the calibration's cells; WSe2 with WSe2 as the host lattice,
   V and Te as dopant and substituent in it, as ``simgen`` calibrates such a dataset).

5. **Detector angles**: the Se2/W, Se/W (single vacancy) and Se2/Se peak ratios of a WSe2
   cell against the HAADF inner angle (40–120 mrad, outer 200 mrad), static lattice
   against 6 and 12 frozen-phonon configurations: why a detector grid is calibrated
   on frozen-phonon references.

About 9 minutes on two CPU cores.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

ELEMENTS = ("S", "Se", "Te", "V", "Mo", "Re", "W")
#: Sub-pixel positions (fractions of a grid step along x, y): a node and places off the
#: nodes of every supersampled grid (quarters alone would sit on the 4x grid's nodes).
OFFSETS = ((0.0, 0.0), (0.125, 0.125), (0.1, 0.55), (0.37, 0.88), (0.63, 0.21), (0.875, 0.375))


def _ideal_80kv() -> dict:
    from simgen.optics import ideal_optics

    return ideal_optics(energy_kV=80.0, semiangle_mrad=30.0, haadf_inner_mrad=60.0,
                        haadf_outer_mrad=200.0)  # fmt: skip


#: 80 kV, 30 mrad, 60–200 mrad, ideal probe.
IDEAL_80KV = _ideal_80kv()


# -- 1. lone atoms -------------------------------------------------------------------------------
def _lone_atom(element: str, frac: float, step: float, *, box_A: float = 6.0):
    from ase import Atoms

    from simgen.simulation import Columns

    x0, y0 = 0.5 * box_A + frac[0] * step, 0.5 * box_A + frac[1] * step
    atoms = Atoms(element, positions=[(x0, y0, 1.0)], cell=[box_A, box_A, 2.0], pbc=True)
    cols = Columns(x=np.array([x0]), y=np.array([y0]), counts=np.array([[1]]), elements=(element,))
    return atoms, cols, (x0, y0)


def lone_atom_signal(element, frac, *, step=0.05, supersampling=4, projection=None):
    """HAADF [fraction of the beam] of a probe on a lone atom ``frac`` of a step off a node.

    ``projection`` ("infinite"/"finite") runs plain abTEM on a ``step`` grid instead of
    simgen's ``simulate`` (whose slicing starts 0.05 Å below the atom either way).
    """
    from simgen.simulation import simulate

    atoms, cols, (x0, y0) = _lone_atom(element, frac, step)
    if projection is None:
        sim = simulate(
            atoms, cols, {**IDEAL_80KV, "pixel_size_A": 0.2}, model="multislice",
            periodic=True, shape=(1, 1), origin=(x0, y0), potential_sampling_A=step,
            transmission_supersampling=supersampling,
        )  # fmt: skip
        return float(sim.image[0, 0])
    import abtem

    n = int(round(atoms.cell[0, 0] / step))
    potential = abtem.Potential(
        atoms, gpts=(n, n), slice_thickness=[0.95, 1.05], projection=projection
    )
    probe = abtem.Probe(energy=80e3, semiangle_cutoff=30.0)
    detector = abtem.AnnularDetector(inner=60.0, outer=200.0)
    meas = probe.scan(potential, scan=abtem.CustomScan([[x0, y0]]), detectors=detector, lazy=False)
    return float(np.asarray(meas.array).ravel()[0])


LONE_VARIANTS = (
    ("abTEM infinite 0.05 Å", {"step": 0.05, "projection": "infinite"}),
    ("abTEM infinite 0.025 Å", {"step": 0.025, "projection": "infinite"}),
    ("abTEM infinite 0.0125 Å", {"step": 0.0125, "projection": "infinite"}),
    ("abTEM finite 0.05 Å", {"step": 0.05, "projection": "finite"}),
    ("abTEM finite 0.0125 Å", {"step": 0.0125, "projection": "finite"}),
    ("simgen 0.05 Å, potential x1", {"step": 0.05, "supersampling": 1}),
    ("simgen 0.05 Å, potential x2", {"step": 0.05, "supersampling": 2}),
    ("simgen 0.05 Å, potential x4 (default)", {"step": 0.05, "supersampling": 4}),
    ("simgen 0.05 Å, potential x8", {"step": 0.05, "supersampling": 8}),
)


def lone_atom_table(elements=ELEMENTS, variants=LONE_VARIANTS):
    """``{variant: {element: (spread, deviation from converged)}}`` and the converged values."""
    converged = {
        e: float(np.mean([lone_atom_signal(e, f, step=0.0125, supersampling=4) for f in OFFSETS]))
        for e in elements
    }
    table = {}
    for name, kw in variants:
        row = {}
        for e in elements:
            v = np.array([lone_atom_signal(e, f, **kw) for f in OFFSETS])
            row[e] = (float(np.ptp(v) / v.mean()), float(v.mean() / converged[e] - 1.0))
        table[name] = row
    return table, converged


# -- 2. slices, 3. PRISM interpolation -------------------------------------------------------
def slice_table():
    from simgen.calibrate import reference_cell
    from simgen.simulation import simulate

    out = {}
    atoms_w, cols_w, (x0, y0) = _lone_atom("W", (0.3, 0.3), 0.05)
    atoms_x, cols_x, kinds = reference_cell("W", "Se", repeats=(1, 1), rng=0)
    i = int(np.nonzero(kinds == "Se2")[0][0])
    for t in (1.0, 0.5, 0.25):
        w = simulate(
            atoms_w, cols_w, {**IDEAL_80KV, "pixel_size_A": 0.2}, model="multislice",
            periodic=True, shape=(1, 1), origin=(x0, y0), slice_thickness_A=t,
        )  # fmt: skip
        x = simulate(
            atoms_x, cols_x, {**IDEAL_80KV, "pixel_size_A": 0.2}, model="multislice",
            periodic=True, shape=(1, 1), origin=(cols_x.x[i], cols_x.y[i]), slice_thickness_A=t,
        )  # fmt: skip
        out[t] = (float(w.image[0, 0]), float(x.image[0, 0]))
    return out


def prism_interpolation_error():
    from simgen.calibrate import reference_cell
    from simgen.simulation import simulate

    atoms, cols, _ = reference_cell("W", "Se", repeats=(4, 2), rng=3)
    opt = {**IDEAL_80KV, "pixel_size_A": 0.2}
    f1 = simulate(atoms, cols, opt, model="prism", interpolation=1, periodic=True)
    f2 = simulate(atoms, cols, opt, model="prism", interpolation=2, periodic=True)
    return float(np.max(np.abs(f2.image - f1.image)) / np.max(f1.image))


# -- 4. incoherent model against the converged reference ----------------------------------
def wse2_test_cell(rng: int = 11):
    """Periodic WSe2 cell (4 x 3) with V dopants, SeTe and Te2 columns, single/double Se
    vacancies and a W vacancy (a site arrangement the calibration never saw)."""
    from ase import Atoms

    from simgen.calibrate import reference_cell
    from simgen.simulation import Columns

    atoms, cols, kinds = reference_cell("W", "Se", others=("Te",), repeats=(4, 3), rng=rng)
    gen = np.random.default_rng(rng)
    kinds = kinds.astype(object)
    symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
    pos = atoms.positions
    counts = np.array(cols.counts)
    index = {e: k for k, e in enumerate(cols.elements)}
    els = tuple(cols.elements) + (("V",) if "V" not in cols.elements else ())
    counts = np.concatenate([counts, np.zeros((len(counts), 1), np.int64)], axis=1)
    index["V"] = len(els) - 1

    def atoms_at(i):
        return np.nonzero(np.hypot(pos[:, 0] - cols.x[i], pos[:, 1] - cols.y[i]) < 0.1)[0]

    for i in gen.choice(np.nonzero(kinds == "W")[0], 3, replace=False):
        symbols[atoms_at(i)] = "V"
        kinds[i] = "V"
        counts[i, index["W"]] -= 1
        counts[i, index["V"]] += 1
    for i in gen.choice(np.nonzero(kinds == "Se2")[0], 2, replace=False):
        symbols[atoms_at(i)] = "Te"
        kinds[i] = "Te2"
        counts[i, index["Te"]] += 2
        counts[i, index["Se"]] -= 2
    new = Atoms(symbols=list(symbols), positions=pos, cell=atoms.cell, pbc=True)
    columns = Columns(x=cols.x, y=cols.y, counts=counts, elements=els)
    return new, columns, np.asarray(kinds, dtype=str), (4, 3)


def mos2_test_cell(rng: int = 12):
    from simgen.calibrate import reference_cell

    atoms, cols, kinds = reference_cell("Mo", "S", repeats=(4, 3), rng=rng)
    return atoms, cols, kinds, (4, 3)


def vacancy_test_cell(metal: str, chalcogen: str, rng: int = 13, n_empty: int = 4):
    """Periodic 4 x 3 host cell with ``n_empty`` double vacancies whose three metal
    neighbours are all host atoms (the vacancy/hollow contrast of ordinary lattice; in
    the dopant cell the one empty site borders a V dopant and a Te2 column). Built like
    the calibration's :func:`simgen.calibrate.isolated_vacancy_cell`, with another seed."""
    from simgen.calibrate import isolated_vacancy_cell

    atoms, cols, kinds = isolated_vacancy_cell(
        metal, chalcogen, n_empty=n_empty, repeats=(4, 3), rng=rng
    )
    return atoms, cols, kinds, (4, 3)


def _values(image, columns, p, points=None):
    from scipy.ndimage import map_coordinates

    img = np.asarray(image, dtype=np.float64)
    x = np.asarray(columns.x if points is None else points[:, 0]) / p
    y = np.asarray(columns.y if points is None else points[:, 1]) / p
    return map_coordinates(img, [y, x], order=3, mode="grid-wrap")


RATIOS = {
    "WSe2": (
        ("W/Se2", "W", "Se2"),
        ("Se1 entry/Se2", "Se_entry", "Se2"),
        ("Se1 exit/Se2", "Se_exit", "Se2"),
        ("Se1 mean/Se2", "Se_single", "Se2"),
        ("V/W", "V", "W"),
        ("SeTe/Se2", "SeTe", "Se2"),
        ("TeSe/Se2", "TeSe", "Se2"),
        ("Te2/Se2", "Te2", "Se2"),
        ("empty Se site/hollow", "empty_X", "hollow"),
        ("empty W site/hollow", "empty_M", "hollow"),
        ("hollow/W (dark level)", "hollow", "W"),
    ),
    "MoS2": (
        ("Mo/S2", "Mo", "S2"),
        ("S1 entry/S2", "S_entry", "S2"),
        ("S1 exit/S2", "S_exit", "S2"),
        ("S1 mean/S2", "S_single", "S2"),
        ("empty S site/hollow", "empty_X", "hollow"),
        ("empty Mo site/hollow", "empty_M", "hollow"),
        ("hollow/Mo (dark level)", "hollow", "Mo"),
    ),
}


def ratio_rows(name, cell, ref_image, fast_image, p):
    """``[(ratio name, reference ratio, model ratio, error)]`` and the image correlation."""
    from simgen.calibrate import _lattice, hollow_sites

    atoms, cols, kinds, repeats = cell
    metal, chalcogen = ("W", "Se") if name == "WSe2" else ("Mo", "S")
    hollow = hollow_sites(_lattice(metal, chalcogen)[0], repeats)
    a, b = np.asarray(ref_image, np.float64), np.asarray(fast_image, np.float64)
    per_kind = {}
    for img, tag in ((a, "ref"), (b, "fast")):
        v = _values(img, cols, p)
        means = {k: float(np.mean(v[kinds == k])) for k in set(kinds)}
        single = np.isin(kinds, [f"{chalcogen}_entry", f"{chalcogen}_exit"])
        means[f"{chalcogen}_single"] = float(np.mean(v[single]))  # what a vac_X1 label holds
        means["hollow"] = float(np.mean(_values(img, cols, p, hollow)))
        per_kind[tag] = means
    rows = []
    for label, num, den in RATIOS[name]:
        if num not in per_kind["ref"] or den not in per_kind["ref"]:
            continue
        r_ref = per_kind["ref"][num] / per_kind["ref"][den]
        r_fast = per_kind["fast"][num] / per_kind["fast"][den]
        rows.append((label, r_ref, r_fast, r_fast / r_ref - 1.0))
    return rows, float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def model_against_reference(name, cell, optics, calibration, *, defocus=(0.0, 30.0, -30.0)):
    """Rows ``(defocus, ratio name, reference ratio, model ratio, error)``, correlations and
    the reference series' seconds (defocus = -C10 [Å]; one S-matrix for all)."""
    from simgen.simulation import simulate, simulate_defocus_series

    atoms, cols, _, _ = cell
    p = 0.1
    opt = {**optics, "pixel_size_A": p}
    t0 = time.perf_counter()
    refs = simulate_defocus_series(
        atoms, cols, opt, [-df for df in defocus], model="prism", interpolation=1,
        periodic=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    rows, corr = [], {}
    for df, ref in zip(defocus, refs, strict=True):
        fast = simulate(atoms, cols, {**opt, "C10_A": -df}, calibration=calibration, periodic=True)
        these, corr[df] = ratio_rows(name, cell, ref.image, fast.image, p)
        rows += [(df, *row) for row in these]
    return rows, corr, seconds


# -- 5. detector angles ---------------------------------------------------------------------------
DETECTOR_INNER_MRAD = (40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 120.0)


def detector_angle_table(frozen_phonons=(0, 6, 12)):
    """``{n_fp: {inner: (Se2/W, Se/W, Se2/Se)}}``: column-centre ratios of a periodic 3 x 2
    WSe2 reference cell (80 kV, 30 mrad, outer 200 mrad), and seconds per series."""
    from simgen.calibrate import NYQUIST_FRACTION, reference_cell
    from simgen.optics import nyquist_sampling_A
    from simgen.simulation import simulate_series

    opt = {**IDEAL_80KV}
    p = NYQUIST_FRACTION * nyquist_sampling_A(opt)
    atoms, columns, _ = reference_cell("W", "Se", repeats=(3, 2), rng=5)
    counts = np.asarray(columns.counts)
    els = list(columns.elements)
    n_w, n_se = counts[:, els.index("W")], counts[:, els.index("Se")]
    groups = {"W": (n_w == 1) & (n_se == 0), "Se": (n_w == 0) & (n_se == 1)}
    groups["Se2"] = (n_w == 0) & (n_se == 2)
    detectors = [(a, 200.0) for a in DETECTOR_INNER_MRAD]
    out, seconds = {}, {}
    for n_fp in frozen_phonons:
        t0 = time.perf_counter()
        series = simulate_series(
            atoms, columns, {**opt, "pixel_size_A": p}, detectors_mrad=detectors,
            model="prism", interpolation=1, periodic=True, frozen_phonons=n_fp,
            rng=np.random.default_rng([0, 0]),
        )  # fmt: skip
        seconds[n_fp] = time.perf_counter() - t0
        out[n_fp] = {}
        for (inner, _), ref in zip(detectors, series, strict=True):
            values = _values(ref.image, columns, p, None)
            m = {k: float(values[g].mean()) for k, g in groups.items()}
            out[n_fp][inner] = (m["Se2"] / m["W"], m["Se"] / m["W"], m["Se2"] / m["Se"])
    return out, seconds


def main() -> None:
    from simgen.calibrate import calibrate

    warnings.filterwarnings("ignore")
    print("\n== bench_convergence: reference numerics and the incoherent model against them")
    t0 = time.perf_counter()
    table, converged = lone_atom_table()
    print(
        "\n1. lone atom HAADF, 80 kV / 30 mrad / 60-200 mrad: spread over 6 sub-pixel "
        "positions | mean vs converged (0.0125 Å waves, potential x4)"
    )
    print("   converged: " + ", ".join(f"{e} {v:.5f}" for e, v in converged.items()))
    print(f"   {'numerics':40s}" + "".join(f"{e:>15s}" for e in ELEMENTS))
    for name, row in table.items():
        cells = "".join(f"{100 * s:6.2f}|{100 * d:+6.2f}%" for s, d in row.values())
        print(f"   {name:40s}{cells}")
    print(f"   ({time.perf_counter() - t0:.0f} s)")

    sl = slice_table()
    print("\n2. slice thickness (defaults otherwise): lone W atom | Se2 column")
    for t, (w, x) in sl.items():
        print(f"   {t:4.2f} Å: {w:.6f} | {x:.6f}")
    print(f"\n3. PRISM f=2 vs f=1, periodic 4 x 2 WSe2 cell (13 x 11 Å): max |diff| / max = "
          f"{100 * prism_interpolation_error():.2f} %")  # fmt: skip

    cases = (  # (name, cell, optics, elements, host lattices: as simgen calibrates a dataset)
        ("WSe2", wse2_test_cell(), {**IDEAL_80KV}, ("W", "V", "Se", "Te"), (("W", "Se"),)),
        ("MoS2", mos2_test_cell(), {**IDEAL_80KV, "energy_kV": 60.0}, ("Mo", "S"), None),
        ("WSe2", vacancy_test_cell("W", "Se"), {**IDEAL_80KV}, ("W", "Se"), None),
        (
            "MoS2",
            vacancy_test_cell("Mo", "S"),
            {**IDEAL_80KV, "energy_kV": 60.0},
            ("Mo", "S"),
            None,
        ),
    )
    print(
        "\n4. calibrated incoherent model vs converged PRISM (f=1, potential 0.0125 Å), "
        "column-centre ratios"
    )
    for name, cell, optics, elements, hosts in cases:
        t1 = time.perf_counter()
        cal = calibrate(optics, elements, hosts=hosts)
        t_cal = time.perf_counter() - t1
        rows, corr, seconds = model_against_reference(name, cell, optics, cal)
        print(
            f"   {name} at {optics['energy_kV']:.0f} kV (calibration {t_cal:.0f} s; "
            f"reference series {seconds:.0f} s)"
        )
        print(f"   {'defocus':>8s} {'ratio':24s} {'reference':>10s} {'model':>8s} {'error':>8s}")
        for df, label, r_ref, r_fast, err in rows:
            print(f"   {df:+7.0f}Å {label:24s} {r_ref:10.4f} {r_fast:8.4f} {100 * err:+7.2f}%")
        corrs = ", ".join(f"{df:+.0f} Å {c:.5f}" for df, c in corr.items())
        print(f"   image correlation: {corrs}")
    table, seconds = detector_angle_table()
    cost = ", ".join(f"{n} configs {t:.0f} s" for n, t in seconds.items())
    print(
        "\n5. detector inner angle (outer 200 mrad), WSe2 3 x 2 cell, column-centre ratios "
        f"by frozen-phonon configurations ({cost})"
    )
    print(f"   {'inner':>6s}" + "".join(f"{'n_fp ' + str(n):>26s}" for n in table))
    print(f"   {'mrad':>6s}" + f"{'Se2/W   Se/W  Se2/Se':>26s}" * len(table))
    for inner in DETECTOR_INNER_MRAD:
        cells = "".join("{:>10.4f}{:>7.4f}{:>9.4f}".format(*table[n][inner]) for n in table)
        print(f"   {inner:6.0f}{cells}")
    print(f"\n   total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
