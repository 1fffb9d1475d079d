"""HAADF image models (simgen.simulation): physics, fidelity, geometry, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hollow_sites, make_tmd_cell, peak_values

from simgen import backend
from simgen.incoherent import IncoherentRenderer
from simgen.optics import OpticsConfig, ideal_optics
from simgen.simulation import Columns, plane_slices, simulate


def _mean_by_kind(values, kinds):
    return {str(k): float(np.mean(values[kinds == k])) for k in np.unique(kinds)}


def _contrast(sim, kinds, metal, chalcogen):
    """Mean peak per column kind and the hollow-site (no column) background."""
    peaks = _mean_by_kind(peak_values(sim.image, sim.rows, sim.cols), kinds)
    bg = peak_values(sim.image, *_rows_cols(sim, hollow_sites(metal, chalcogen)))
    return peaks, float(np.mean(bg))


# -- physics --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["prism", "incoherent"])
def test_z_contrast(model, prism_defect_cell, calibration_for):
    results = {}
    for metal, chalcogen in (("Mo", "S"), ("W", "Se")):
        atoms, columns, kinds, ref = prism_defect_cell(metal, chalcogen)
        if model == "prism":
            sim = ref
        else:
            cal = calibration_for((metal, chalcogen))
            sim = simulate(atoms, columns, {"pixel_size_A": 0.2}, calibration=cal, periodic=True)
        results[metal + chalcogen] = _contrast(sim, kinds, metal, chalcogen)
    (mos2, bg_mos2), (wse2, bg_wse2) = results["MoS"], results["WSe"]
    assert wse2["M"] > mos2["M"]  # W (Z 74) brighter than Mo (42)
    assert wse2["X2"] > mos2["X2"]  # Se2 brighter than S2
    for peaks, bg in ((mos2, bg_mos2), (wse2, bg_wse2)):
        assert peaks["M"] > peaks["X2"]  # a metal atom outshines two chalcogens
        full = peaks["X2"] - bg
        assert 0.35 < (peaks["X1"] - bg) / full < 0.65  # one chalcogen left
        for empty in ("empty_X", "empty_M"):  # an empty site sits at background
            assert abs(peaks[empty] - bg) < 0.1 * full


@pytest.mark.parametrize(("metal", "chalcogen"), [("Mo", "S"), ("W", "Se")])
def test_incoherent_matches_prism(metal, chalcogen, prism_defect_cell, calibration_for):
    atoms, columns, kinds, ref = prism_defect_cell(metal, chalcogen)
    cal = calibration_for((metal, chalcogen))
    inc = simulate(atoms, columns, {"pixel_size_A": 0.2}, calibration=cal, periodic=True)
    assert inc.image.shape == ref.image.shape and inc.image.dtype == np.float32
    corr = np.corrcoef(inc.image.ravel(), ref.image.ravel())[0, 1]
    occupied = np.asarray(columns.counts).sum(axis=1) > 0
    a = peak_values(inc.image, inc.rows, inc.cols)[occupied]
    b = peak_values(ref.image, ref.rows, ref.cols)[occupied]
    median_err = float(np.median(np.abs(a - b) / b))
    # measured: MoS2 0.99994 / 0.7 %, WSe2 0.99996 / 0.7 % (see docs/physics.md)
    assert corr >= 0.98
    assert median_err <= 0.05
    # same units: fraction of the beam on the detector
    assert inc.image.mean() == pytest.approx(ref.image.mean(), rel=0.05)
    assert inc.calibration_key == cal.key and inc.calibration is cal


def test_aberrations_change_the_image(toy_calibration):
    atoms, columns, kinds = make_tmd_cell("W", "Se", repeats=(3, 2))
    base = simulate(atoms, columns, {}, calibration=toy_calibration, periodic=True).image
    peak = base.max()
    for change in ({"C10_A": -20.0}, {"C23_A": 1000.0, "phi23_deg": 20.0}, {"C21_A": 800.0}):
        img = simulate(atoms, columns, change, calibration=toy_calibration, periodic=True).image
        assert np.abs(img - base).max() > 0.05 * peak, change
    defocused = simulate(
        atoms, columns, {"C10_A": 40.0}, calibration=toy_calibration, periodic=True
    )
    assert defocused.image.max() < 0.85 * peak  # defocus spreads the probe
    # a larger source blurs the image: lower peaks, same mean
    blurred = simulate(
        atoms, columns, {"source_size_A": 1.2}, calibration=toy_calibration, periodic=True
    ).image
    assert blurred.max() < 0.8 * peak
    assert blurred.mean() == pytest.approx(base.mean(), rel=0.02)


def test_single_vacancy_depth_shows_out_of_focus(toy_calibration):
    """A single chalcogen column is imaged with the probe refocused to its atom's height:
    in focus the entrance-side and exit-side atoms read the same, out of focus they
    differ, with the sign converged PRISM gives (at 30 Å defocus, C10 = -30 Å, the
    entrance-side Se reads 7 % below the exit-side one; tables in docs/physics.md)."""
    from simgen.calibrate import reference_cell
    from simgen.simulation import single_atom_heights

    atoms, columns, kinds = reference_cell("W", "Se", repeats=(4, 3), rng=2)
    cell = tuple(atoms.cell.lengths()[:2])
    z = single_atom_heights(atoms, columns.x, columns.y, columns.counts, cell)
    assert np.all(z[kinds == "Se_entry"] < -1.5) and np.all(z[kinds == "Se_exit"] > 1.5)
    assert np.all(np.abs(z[(kinds == "W") | (kinds == "Se2")]) < 0.05)

    flipped = atoms.copy()  # the same cell upside down: entrance and exit sides swap
    z_atoms = flipped.positions[:, 2]
    flipped.positions[:, 2] = z_atoms.max() + z_atoms.min() - z_atoms
    single = kinds == "Se_entry"

    def upright_over_flipped(c10):
        v = []
        for a in (atoms, flipped):
            sim = simulate(
                a, columns, {"pixel_size_A": 0.1, "C10_A": c10}, calibration=toy_calibration,
                periodic=True,
            )  # fmt: skip
            v.append(np.mean(peak_values(sim.image, sim.rows, sim.cols)[single]))
        return v[0] / v[1]

    assert upright_over_flipped(0.0) == pytest.approx(1.0, abs=1e-4)
    assert upright_over_flipped(-30.0) < 0.97
    assert upright_over_flipped(30.0) > 1.03


def test_coma_shifts_columns_along_its_azimuth(toy_calibration):
    atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(3, 2))
    opt = {"pixel_size_A": 0.1, "source_size_A": 0.0}
    base = simulate(atoms, columns, opt, calibration=toy_calibration, periodic=True).image
    coma = simulate(
        atoms, columns, {**opt, "C21_A": 1500.0}, calibration=toy_calibration, periodic=True
    ).image
    # coma moves the probe's intensity centroid by +C21 alpha^2 / 3 = 0.45 Å along phi21 = 0
    # (see test_optics), so a column lights up when the probe sits 0.45 Å before it: the
    # image moves along -x, not along y. Compare cross-correlation peaks.
    f = np.fft.fft2(coma - coma.mean()) * np.conj(np.fft.fft2(base - base.mean()))
    xc = np.fft.ifft2(f).real
    dr, dc = np.unravel_index(xc.argmax(), xc.shape)
    dr = dr - xc.shape[0] if dr > xc.shape[0] // 2 else dr
    dc = dc - xc.shape[1] if dc > xc.shape[1] // 2 else dc
    assert dr == 0 and -6 <= dc <= -2


# -- geometry -------------------------------------------------------------------------------
def test_column_positions_match_image_maxima(toy_calibration):
    from structures import build_monolayer, column_table

    ml = build_monolayer("MoS2", fov=(40.0, 40.0), rotation_deg=12.0, margin=6.0, rng=3)
    table = column_table(ml)
    x0, y0 = ml.fov_origin[0] + 0.37, ml.fov_origin[1] + 0.11  # not on the pixel grid
    sim = simulate(
        ml.atoms,
        table,
        {"pixel_size_A": 0.2, "source_size_A": 0.6},
        calibration=toy_calibration,
        shape=(180, 190),
        origin=(x0, y0),
    )
    img = np.asarray(sim.image, dtype=np.float64)
    h, w = img.shape
    metal = (table.site == 0) & (table.n_atoms > 0)
    inside = (sim.rows > 3) & (sim.rows < h - 4) & (sim.cols > 3) & (sim.cols < w - 4)
    errors = []
    for r, c in zip(sim.rows[metal & inside], sim.cols[metal & inside], strict=True):
        r0, c0 = int(round(r)), int(round(c))
        patch = img[r0 - 2 : r0 + 3, c0 - 2 : c0 + 3]
        i, j = np.unravel_index(patch.argmax(), patch.shape)
        rr, cc = r0 - 2 + i, c0 - 2 + j
        # sub-pixel maximum: parabola through the 3 neighbours on each axis
        dy = (
            0.5
            * (img[rr - 1, cc] - img[rr + 1, cc])
            / (img[rr - 1, cc] - 2 * img[rr, cc] + img[rr + 1, cc])
        )
        dx = (
            0.5
            * (img[rr, cc - 1] - img[rr, cc + 1])
            / (img[rr, cc - 1] - 2 * img[rr, cc] + img[rr, cc + 1])
        )
        errors.append(np.hypot(rr + dy - r, cc + dx - c))
    assert len(errors) > 50
    assert max(errors) < 0.3


def test_rows_cols_follow_the_pixel_convention(toy_calibration):
    atoms, columns, _ = make_tmd_cell("Mo", "S", repeats=(3, 2))
    sim = simulate(
        atoms,
        columns,
        {"pixel_size_A": 0.25},
        calibration=toy_calibration,
        window=(1.0, 2.0, 6.0, 5.0),
    )
    assert sim.image.shape == (20, 24)
    assert np.allclose(sim.cols, (columns.x - 1.0) / 0.25)
    assert np.allclose(sim.rows, (columns.y - 2.0) / 0.25)
    assert sim.origin_A == (1.0, 2.0) and sim.pixel_size_A == 0.25


def test_shifting_the_origin_by_whole_pixels_shifts_the_image(toy_calibration):
    atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(3, 2))
    a = simulate(
        atoms, columns, {}, calibration=toy_calibration, shape=(30, 30), origin=(0.5, 0.7)
    ).image
    b = simulate(
        atoms,
        columns,
        {},
        calibration=toy_calibration,
        shape=(30, 30),
        origin=(0.5 + 3 * 0.2, 0.7 + 2 * 0.2),
    ).image
    assert np.allclose(a[2:, 3:], b[:-2, :-3], atol=1e-7)


def test_coarse_pixels_are_point_samples_of_the_fine_image(toy_calibration):
    """Above the Nyquist step every model simulates finer and keeps every m-th point."""
    atoms, columns, _ = make_tmd_cell("Mo", "S", repeats=(3, 2))
    fine = simulate(
        atoms,
        columns,
        {"pixel_size_A": 0.25},
        calibration=toy_calibration,
        shape=(30, 30),
        origin=(0.3, 0.4),
    )
    coarse = simulate(
        atoms,
        columns,
        {"pixel_size_A": 0.5},
        calibration=toy_calibration,
        shape=(15, 15),
        origin=(0.3, 0.4),
    )
    assert coarse.info["step_A"] <= 0.9 * 0.349
    assert np.allclose(coarse.image, fine.image[::2, ::2], atol=1e-6 * fine.image.max())


def test_reference_models_sample_and_resample():
    atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(2, 1))
    kw = {"model": "prism", "interpolation": 1, "periodic": True}
    ref = simulate(atoms, columns, {"pixel_size_A": 0.2}, **kw)
    coarse = simulate(atoms, columns, {"pixel_size_A": 0.4}, shape=(10, 12), **kw)
    assert coarse.info["scan_step_A"] == pytest.approx(0.2)
    assert np.allclose(coarse.image, ref.image[:20:2, :24:2], rtol=2e-3, atol=1e-6)
    # scanning on a coarser step and resampling with splines: within 1.5 % of the maximum
    res = simulate(atoms, columns, {"pixel_size_A": 0.2}, shape=(20, 25), scan_sampling_A=0.3, **kw)
    assert res.info["resampled"]
    assert np.abs(res.image - ref.image[:20, :25]).max() < 0.015 * ref.image.max()


def test_multislice_agrees_with_prism():
    atoms, columns, _ = make_tmd_cell("Mo", "S", repeats=(2, 1))
    kw = {"shape": (3, 4), "origin": (2.0, 2.2), "periodic": True}
    ms = simulate(atoms, columns, {"pixel_size_A": 0.2}, model="multislice", **kw)
    pr = simulate(atoms, columns, {"pixel_size_A": 0.2}, model="prism", interpolation=1, **kw)
    assert ms.model == "multislice" and ms.calibration_key is None
    assert np.allclose(ms.image, pr.image, rtol=2e-3)


def test_defocus_series_equals_single_images():
    """One S-matrix reduced at several defoci gives the images of separate simulations."""
    from simgen.simulation import simulate_defocus_series

    atoms, columns, _ = make_tmd_cell("Mo", "S", repeats=(2, 1))
    kw = {"model": "prism", "interpolation": 1, "periodic": True, "shape": (6, 8)}
    opt = {"pixel_size_A": 0.3, "C12_A": 20.0}
    series = simulate_defocus_series(atoms, columns, opt, [0.0, -25.0], **kw)
    assert [s.params["C10_A"] for s in series] == [0.0, -25.0]
    for sim, c10 in zip(series, (0.0, -25.0), strict=True):
        one = simulate(atoms, columns, {**opt, "C10_A": c10}, **kw)
        assert np.allclose(sim.image, one.image, rtol=1e-5, atol=1e-7)
    assert not np.allclose(series[0].image, series[1].image, rtol=1e-2)
    with pytest.raises(ValueError, match="prism or multislice"):
        simulate_defocus_series(atoms, columns, opt, [0.0], model="incoherent")


def test_detector_series_equals_single_images():
    """Several detectors read from one set of exit waves give the separate simulations'
    images, and a higher inner angle collects less of the scattered beam."""
    from simgen.simulation import simulate_series

    atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(2, 1))
    kw = {"model": "prism", "interpolation": 1, "periodic": True, "shape": (6, 8)}
    opt = {"pixel_size_A": 0.3}
    detectors = [(60.0, 200.0), (100.0, 200.0), (60.0, 150.0)]
    series = simulate_series(atoms, columns, opt, C10_A=[0.0, 20.0], detectors_mrad=detectors, **kw)
    assert len(series) == 6
    for sim, (c10, (a, b)) in zip(
        series, [(c, d) for c in (0.0, 20.0) for d in detectors], strict=True
    ):
        assert (sim.params["C10_A"], sim.params["haadf_inner_mrad"]) == (c10, a)
        one = simulate(
            atoms, columns, {**opt, "C10_A": c10, "haadf_inner_mrad": a, "haadf_outer_mrad": b},
            **kw,
        )  # fmt: skip
        assert np.allclose(sim.image, one.image, rtol=1e-5, atol=1e-7)
    assert series[1].image.max() < 0.7 * series[0].image.max()
    assert series[2].image.max() < series[0].image.max()
    with pytest.raises(ValueError, match="inner < outer"):
        simulate_series(atoms, columns, opt, detectors_mrad=[(200.0, 60.0)], **kw)


def test_plane_slices_start_at_atomic_planes():
    slices = plane_slices([1.25, 2.93, 4.42, 1.27], 5.67, 1.0)
    edges = np.cumsum((0.0,) + slices)
    assert edges[-1] == pytest.approx(5.67)
    for z in (1.25, 2.93, 4.42):
        assert np.min(np.abs(edges - (z - 0.05))) < 1e-9
    assert max(slices) <= 1.0


_IDEAL_80KV = ideal_optics(
    energy_kV=80.0, semiangle_mrad=30.0, haadf_inner_mrad=60.0, haadf_outer_mrad=200.0,
    pixel_size_A=0.2,
)  # fmt: skip


#: Sub-pixel positions of the atom (fractions of the 0.05 Å step along x, y): a node, and
#: places off the nodes of the 4x finer potential grid too (quarters alone would sit on them).
_OFFSETS = ((0.0, 0.0), (0.125, 0.125), (0.1, 0.55), (0.37, 0.88), (0.63, 0.21), (0.875, 0.375))


def _lone_atom_signal(element, frac, **overrides):
    """HAADF of a probe on a lone atom that sits ``frac`` (x, y) of a 0.05 Å step off a node."""
    from ase import Atoms

    x0, y0 = 3.0 + frac[0] * 0.05, 3.0 + frac[1] * 0.05
    atoms = Atoms(element, positions=[(x0, y0, 1.0)], cell=[6.0, 6.0, 2.0], pbc=True)
    columns = Columns(
        x=np.array([x0]), y=np.array([y0]), counts=np.array([[1]]), elements=(element,)
    )
    sim = simulate(
        atoms, columns, _IDEAL_80KV, model="multislice", periodic=True, shape=(1, 1),
        origin=(x0, y0), **overrides,
    )  # fmt: skip
    return float(sim.image[0, 0])


def test_lone_atom_haadf_does_not_depend_on_its_sub_pixel_position():
    """At the default numerics (0.05 Å waves, potential supersampled 4x) a lone atom's
    HAADF varies < 1 % with where it sits on the grid; abTEM's plain potential on the same
    grid (supersampling 1) varies by > 5 % for W, which is what the default fixes."""
    for element in ("S", "Se", "Te", "V", "Mo", "Re", "W"):
        values = np.array([_lone_atom_signal(element, f) for f in _OFFSETS])
        assert np.ptp(values) / values.mean() < 0.01, (element, values)
    plain = np.array(
        [_lone_atom_signal("W", f, transmission_supersampling=1) for f in _OFFSETS[::2]]
    )
    assert np.ptp(plain) / plain.mean() > 0.05, plain


# -- randomness and devices -----------------------------------------------------------------
def test_same_seed_same_image(toy_calibration):
    atoms, columns, _ = make_tmd_cell("Mo", "S", repeats=(2, 1))
    cfg = OpticsConfig.stem_learning().replace(
        semiangle_mrad=30, haadf_inner_mrad=60, pixel_size_A=0.3
    )
    a = simulate(atoms, columns, cfg, calibration=toy_calibration, rng=11)
    b = simulate(atoms, columns, cfg, calibration=toy_calibration, rng=11)
    c = simulate(atoms, columns, cfg, calibration=toy_calibration, rng=12)
    assert a.params == b.params and np.array_equal(a.image, b.image)
    assert a.params != c.params
    kw = {"model": "prism", "frozen_phonons": 2, "interpolation": 1, "periodic": True}
    opt = {"pixel_size_A": 0.6}
    f1 = simulate(atoms, columns, opt, rng=5, **kw)
    f2 = simulate(atoms, columns, opt, rng=5, **kw)
    f3 = simulate(atoms, columns, opt, rng=6, **kw)
    assert np.array_equal(f1.image, f2.image)
    assert not np.array_equal(f1.image, f3.image)


@pytest.mark.gpu
def test_gpu_matches_cpu(toy_calibration):
    if not backend.gpu_available():
        pytest.skip("no CuPy / CUDA device")
    atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(2, 1))
    opt = {"C10_A": 10.0, "C23_A": 200.0, "focal_spread_A": 20.0, "pixel_size_A": 0.25}
    for model in ("incoherent", "prism"):
        kw = {"calibration": toy_calibration} if model == "incoherent" else {"interpolation": 1}
        cpu = simulate(atoms, columns, opt, model=model, periodic=True, device="cpu", **kw)
        gpu = simulate(atoms, columns, opt, model=model, periodic=True, device="gpu", **kw)
        assert backend.device_of(gpu.image) == "gpu" and gpu.image.dtype == np.float32
        host = backend.to_numpy(gpu.image)
        assert np.allclose(host, cpu.image, rtol=1e-3, atol=1e-5 * cpu.image.max()), model


# -- errors ---------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(toy_calibration):
    atoms, columns, _ = make_tmd_cell("Mo", "S", repeats=(2, 1))
    cal = toy_calibration
    with pytest.raises(ValueError, match="model"):
        simulate(atoms, columns, {}, model="bloch", calibration=cal)
    if not backend.gpu_available():
        with pytest.raises(RuntimeError, match="gpu"):
            simulate(atoms, columns, {}, calibration=cal, device="gpu")
    with pytest.raises(ValueError, match="device"):
        simulate(atoms, columns, {}, calibration=cal, device="tpu")
    with pytest.raises(ValueError, match="window"):
        simulate(atoms, columns, {}, calibration=cal, window=(-3.0, 0.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="window"):
        simulate(atoms, columns, {}, calibration=cal, window=(1.0, 1.0, 40.0, 2.0))
    with pytest.raises(ValueError, match="window"):
        simulate(atoms, columns, {}, calibration=cal, shape=(5, 500))
    with pytest.raises(ValueError, match="calibration"):
        simulate(atoms, columns, {})
    with pytest.raises(ValueError, match="calibration"):
        simulate(atoms, columns, {"energy_kV": 60}, calibration=cal)
    te = Columns(columns.x, columns.y, columns.counts[:, ::-1], ("Te", "Re"))
    with pytest.raises(ValueError, match="calibration"):
        simulate(atoms, te, {}, calibration=cal)
    with pytest.raises(ValueError, match="columns"):
        simulate(
            atoms,
            Columns(columns.x[:-1], columns.y, columns.counts, ("Mo", "S")),
            {},
            calibration=cal,
        )
    with pytest.raises(ValueError, match="elements"):
        simulate(
            atoms, Columns(columns.x, columns.y, columns.counts, ("Mo", "Xx")), {}, calibration=cal
        )
    with pytest.raises(ValueError, match="optics"):
        simulate(atoms, columns, {"defocus": 3}, calibration=cal)
    with pytest.raises(ValueError, match="pixel_size_A"):
        simulate(atoms, columns, {}, calibration=cal, pixel_size_A=-0.1)
    with pytest.raises(ValueError, match="frozen_phonons"):
        simulate(atoms, columns, {}, calibration=cal, frozen_phonons=-1)
    with pytest.raises(ValueError, match="potential_sampling_A"):
        simulate(atoms, columns, {}, model="prism", potential_sampling_A=0.1)
    with pytest.raises(ValueError, match="scan_sampling_A"):
        simulate(atoms, columns, {}, model="prism", scan_sampling_A=0.5)
    sheared = atoms.copy()
    sheared.set_cell([[6.3, 0, 0], [3.1, 5.5, 0], [0, 0, 5.7]])
    with pytest.raises(ValueError, match="orthogonal"):
        simulate(sheared, columns, {}, calibration=cal)


def test_renderer_rejects_too_wide_peaks():
    r = IncoherentRenderer({}, 0.2, (0.0, 0.0), (8, 8))
    with pytest.raises(ValueError, match="sigma_A"):
        r.render([0.5], [0.5], [0.01], [0.9])


# -- slow -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_non_periodic_rotated_cell_matches_prism(calibration_for):
    """A rotated, non-periodic cell with a margin: no wrap-around reaches the window."""
    from structures import apply_defects, build_monolayer, column_table

    ml = build_monolayer("MoS2", fov=(10.0, 10.0), rotation_deg=12.0, margin=6.0, rng=0)
    ml = apply_defects(ml, {"vac_X1": 2, "vac_X2": 1}, by="count", rng=1)
    table = column_table(ml)
    opt = {"pixel_size_A": 0.2, "source_size_A": 0.5}
    window = (*ml.fov_origin, *ml.fov_extent)
    ref = simulate(ml.atoms, table, opt, model="prism", interpolation=3, window=window)
    inc = simulate(ml.atoms, table, opt, calibration=calibration_for(("Mo", "S")), window=window)
    h, w = inc.image.shape
    keep = (inc.rows > 1) & (inc.rows < h - 2) & (inc.cols > 1) & (inc.cols < w - 2)
    keep &= table.n_atoms > 0
    a = peak_values(inc.image, inc.rows[keep], inc.cols[keep])
    b = peak_values(ref.image, ref.rows[keep], ref.cols[keep])
    assert np.corrcoef(inc.image.ravel(), ref.image.ravel())[0, 1] > 0.999
    assert np.median(np.abs(a - b) / b) < 0.03
    # the border rows/columns agree as well as the interior (no wrap-around artefacts)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        assert inc.image[edge].mean() == pytest.approx(ref.image[edge].mean(), rel=0.05)


def test_pointsum_model_scales_as_z_squared_without_channelling():
    """The foreign physics of the robustness benchmark is linear in atoms: removing one Se
    of a column takes away half of what removing both does (no channelling), and a W atom
    takes away (74/34)² of one Se; no background."""
    from simgen.config import SimulationConfig
    from simgen.incoherent import pointsum_calibration

    optics = OpticsConfig().draw(0)
    cal = pointsum_calibration(("W", "Se"), optics, exponent=2.0)
    assert cal.weights_A2["W"] / cal.weights_A2["Se"] == pytest.approx((74 / 34) ** 2)
    assert set(cal.kappa.values()) == {1.0} and cal.background == 0.0

    def image(**vacancies):
        atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(3, 2), **vacancies)
        sim = simulate(atoms, columns, {"pixel_size_A": 0.1}, calibration=cal, periodic=True)
        return sim, peak_values(sim.image, sim.rows, sim.cols)

    full, at_full = image()
    n_metal = 12  # construction order: metal sites first (3 x 2 cells, two per cell)
    _, at_x1 = image(vac_x1=(3,))
    _, at_x2 = image(vac_x2=(3,))
    _, at_m = image(vac_m=(5,))
    one_se = at_full[n_metal + 3] - at_x1[n_metal + 3]
    both_se = at_full[n_metal + 3] - at_x2[n_metal + 3]
    one_w = at_full[5] - at_m[5]
    assert both_se / one_se == pytest.approx(2.0, rel=1e-4)
    assert one_w / one_se == pytest.approx((74 / 34) ** 2, rel=1e-4)
    assert float(full.image.min()) > 0 and cal.background == 0.0
    n15 = pointsum_calibration(("W", "Se"), optics, exponent=1.5)
    assert n15.weights_A2["W"] / n15.weights_A2["Se"] == pytest.approx((74 / 34) ** 1.5)
    for bad in ({"exponent": 0.5}, {"width_A": 0.0}):
        with pytest.raises(ValueError):
            pointsum_calibration(("W", "Se"), optics, **bad)
    with pytest.raises(ValueError, match="pointsum_exponent"):
        SimulationConfig(model="pointsum", pointsum_exponent=4.0)


def test_z_exponent_shift_brightens_the_metal_and_keeps_the_chalcogen_ratio(toy_calibration):
    """``optics.z_exponent_shift`` δ scales each atom by (Z/42)^δ: the metal/chalcogen-pair
    object contrast grows by about (74/34)^δ, one Se against two stays as calibrated, and
    the calibration recorded is the unshifted one."""
    from simgen.config import load_config
    from simgen.pipeline import check_ready

    def contrasts(shift):
        atoms, columns, _ = make_tmd_cell("W", "Se", repeats=(3, 2), vac_x1=(3,))
        opt = {"pixel_size_A": 0.1, "z_exponent_shift": shift}
        sim = simulate(atoms, columns, opt, calibration=toy_calibration, periodic=True)
        hollow = peak_values(sim.image, *_rows_cols(sim, hollow_sites("W", "Se"))).mean()
        v = peak_values(sim.image, sim.rows, sim.cols) - hollow
        n_metal = 12  # construction order: metal sites first, then chalcogen sites
        metal, pair = np.median(v[:n_metal]), np.median(np.delete(v[n_metal:], 3))
        return metal / pair, v[n_metal + 3] / pair, sim

    m0, one0, sim0 = contrasts(0.0)
    m1, one1, sim1 = contrasts(0.75)
    assert m1 / m0 == pytest.approx((74 / 34) ** 0.75, rel=0.1)
    assert one1 == pytest.approx(one0, rel=0.02)
    assert sim1.calibration_key == sim0.calibration_key == toy_calibration.key
    assert toy_calibration.with_z_exponent_shift(0.0) is toy_calibration
    shifted = toy_calibration.with_z_exponent_shift(0.5)
    assert shifted.weights_A2["Mo"] == pytest.approx(toy_calibration.weights_A2["Mo"])
    assert shifted.key != toy_calibration.key
    for model in ("prism", "auto"):  # the wave models take it too (next test)
        cfg = load_config().with_overrides(
            {"simulation.model": model, "optics.z_exponent_shift": {"uniform": [0.0, 0.5]}}
        )
        check_ready(cfg)
    # drawn last: drawing it changes no other optics value
    drawn = OpticsConfig(z_exponent_shift={"uniform": [-0.3, 0.9]}).draw(5)
    plain = OpticsConfig().draw(5)
    assert {k: v for k, v in drawn.items() if k != "z_exponent_shift"} == {
        k: v for k, v in plain.items() if k != "z_exponent_shift"
    }
    assert plain["z_exponent_shift"] == 0.0 and -0.3 <= drawn["z_exponent_shift"] <= 0.9


def test_z_exponent_shift_in_prism_scales_the_potentials(prism_defect_cell):
    """PRISM takes δ as each element's potential x (Z/42)^(δ/2): the metal/chalcogen-pair
    contrast rises (by less than the incoherent model's (74/34)^δ: W's strong potential
    scatters sub-quadratically), one Se against two stays, and the image records the
    factors."""
    contrast = {}
    for shift in (0.0, 0.75):
        atoms, columns, kinds, sim = prism_defect_cell("W", "Se", z_exponent_shift=shift)
        peaks, bg = _contrast(sim, kinds, "W", "Se")
        full = peaks["X2"] - bg
        contrast[shift] = ((peaks["M"] - bg) / full, (peaks["X1"] - bg) / full)
    rise = contrast[0.75][0] / contrast[0.0][0]
    assert (74 / 34) ** (0.75 / 2) < rise < (74 / 34) ** 0.75
    assert contrast[0.75][1] == pytest.approx(contrast[0.0][1], rel=0.03)
    assert sim.info["potential_scale"]["W"] == pytest.approx((74 / 42) ** 0.375)
    assert "potential_scale" not in prism_defect_cell("W", "Se")[3].info


def _rows_cols(sim, xy):
    """Pixel (rows, cols) of points ``xy`` [Å] in a simulation's window."""
    x0, y0 = sim.origin_A
    xy = np.asarray(xy, dtype=np.float64)
    return (xy[:, 1] - y0) / sim.pixel_size_A, (xy[:, 0] - x0) / sim.pixel_size_A
