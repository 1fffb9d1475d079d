"""Calibration of the incoherent model (simgen.calibrate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import peak_values

from simgen.calibrate import (
    Calibration,
    calibration_key,
    fit_calibration,
    isolated_vacancy_cell,
    reference_cell,
    reference_cells,
)
from simgen.incoherent import periodic_images
from simgen.simulation import simulate


def test_reference_cell_holds_every_column_type():
    atoms, columns, kinds = reference_cell("Mo", "S", others=("Se",), rng=0)
    assert columns.elements == ("S", "Se", "Mo")
    names, counts = np.unique(kinds, return_counts=True)
    found = dict(zip(names.tolist(), counts.tolist(), strict=True))
    assert found["S_entry"] == 3 and found["S_exit"] == 3
    assert found["empty_X"] == 1 and found["empty_M"] == 1
    # substituents in the host lattice: both orders and a full column
    assert found["SSe"] == 1 and found["SeS"] == 1 and found["Se2"] == 1
    n_sites = len(kinds) // 2
    assert found["Mo"] == n_sites - 1 and found["S2"] == n_sites - 3 - 3 - 1 - 3
    # columns and atoms agree: every atom sits on its column, counts match
    assert np.asarray(columns.counts).sum() == len(atoms)
    lx, ly, lz = atoms.cell.lengths()
    assert np.allclose(atoms.cell[:], np.diag([lx, ly, lz]))
    xy = atoms.positions[:, :2]
    d = np.hypot(xy[:, None, 0] - columns.x[None], xy[:, None, 1] - columns.y[None])
    assert np.all(d.min(axis=1) < 1e-9)
    # single chalcogens on the entrance side are lower in z (abTEM propagates along +z)
    z = atoms.positions[:, 2]
    entry = np.flatnonzero(kinds == "S_entry")
    exit_ = np.flatnonzero(kinds == "S_exit")
    z_of = {i: z[np.argmin(np.hypot(*(xy - (columns.x[i], columns.y[i])).T))] for i in entry}
    z_ex = {i: z[np.argmin(np.hypot(*(xy - (columns.x[i], columns.y[i])).T))] for i in exit_}
    assert max(z_of.values()) < min(z_ex.values())
    # deterministic for a seed
    again = reference_cell("Mo", "S", others=("Se",), rng=0)
    assert np.array_equal(again[2], kinds)


def test_reference_cells_cover_every_pair():
    cells = reference_cells(["W", "Mo", "Se", "S"])
    formulas = sorted(c[0].get_chemical_formula() for c in cells)
    assert len(cells) == 8  # a reference cell and an isolated-vacancy cell per pair
    assert all(("Mo" in f) != ("W" in f) for f in formulas)
    with pytest.raises(ValueError, match="elements"):
        reference_cells(["Mo", "W"])
    with pytest.raises(ValueError, match="elements"):
        reference_cells(["Mo", "Qq"])


def test_isolated_vacancy_cell_has_vacancies_among_pristine_columns():
    atoms, columns, kinds = isolated_vacancy_cell("W", "Se", n_empty=3, rng=5)
    empty = np.flatnonzero(kinds == "empty_X")
    assert empty.size == 3
    assert np.all(np.asarray(columns.counts)[empty] == 0)
    xy = np.stack([columns.x, columns.y], axis=1)
    box = np.asarray(atoms.cell.lengths()[:2])
    ordinary = 0
    for i in empty:
        near = np.hypot(*(((xy - xy[i] + box / 2) % box - box / 2).T)) < 2.5
        near[i] = False
        assert near.sum() == 3  # the three metal neighbours
        ordinary += all(k in ("W", "Se2") for k in kinds[near])
    assert ordinary >= 2  # the reference cell's own empty site may border other defects
    # no atom is left on an empty site
    for i in empty:
        assert np.min(np.hypot(*(atoms.positions[:, :2] - xy[i]).T)) > 1.0
    again = isolated_vacancy_cell("W", "Se", n_empty=3, rng=5)
    assert np.array_equal(again[2], kinds)


def test_fit_recovers_known_parameters(toy_calibration):
    """A synthetic incoherent image is fitted back to its own parameters (two tails)."""
    import dataclasses

    atoms, columns, _ = reference_cell("W", "Se", others=("S",), rng=1)
    tails = {"S": 0.0003, "Se": 0.001, "Mo": 0.0, "W": 0.002}
    broad = {"S": 0.0001, "Se": 0.0004, "Mo": 0.0, "W": 0.0008}
    truth = dataclasses.replace(
        toy_calibration, tails_A2=tails, tail_width_A=0.4, tails2_A2=broad, tail2_width_A=1.2
    )
    cell = tuple(atoms.cell.lengths()[:2])
    flat = atoms.copy()  # every atom at the mid-plane: the fit's model (no refocused probe)
    flat.positions[:, 2] = np.mean(atoms.positions[:, 2])
    img = simulate(
        flat,
        columns,
        {"pixel_size_A": 0.3, "source_size_A": 0.0},
        calibration=truth,
        periodic=True,
    ).image
    cal = fit_calibration(img, columns, {"source_size_A": 0.0}, pixel_size_A=0.3, cell_xy=cell)
    for e in ("Se", "W"):
        assert cal.weights_A2[e] == pytest.approx(truth.weights_A2[e], rel=0.01)
        assert cal.widths_A[e] == pytest.approx(truth.widths_A[e], abs=0.01)
    assert cal.kappa["Se"] == pytest.approx(truth.kappa["Se"], rel=0.01)
    assert cal.background == pytest.approx(truth.background, rel=0.05)
    assert cal.tail_width_A == pytest.approx(0.4, abs=0.03)
    assert cal.tail2_width_A == pytest.approx(1.2, abs=0.06)
    for e in ("S", "Se", "W"):
        assert cal.tails_A2[e] == pytest.approx(tails[e], rel=0.05, abs=2e-5)
        assert cal.tails2_A2[e] == pytest.approx(broad[e], rel=0.1, abs=2e-5)
    assert cal.fit["correlation"] > 0.99999
    # without the tail term the same image fits worse: the term is not a free ride
    plain = fit_calibration(
        img, columns, {"source_size_A": 0.0}, pixel_size_A=0.3, cell_xy=cell, tails=False
    )
    assert plain.fit["rms_relative"] > 3 * cal.fit["rms_relative"]


def test_calibration_values_are_physical(calibration_for):
    mos2, wse2 = calibration_for(("Mo", "S")), calibration_for(("W", "Se"))
    w = {**mos2.weights_A2, **wse2.weights_A2}
    assert w["W"] > w["Mo"] > w["Se"] > w["S"] > 0  # Z-contrast: 74 > 42 > 34 > 16
    # HAADF cross-sections follow roughly Z^1.6-1.8 (Krivanek et al. 2010)
    z = {"S": 16, "Se": 34, "Mo": 42, "W": 74}
    n = np.polyfit(np.log([z[e] for e in w]), np.log([w[e] for e in w]), 1)[0]
    assert 1.4 < n < 2.0
    for cal in (mos2, wse2):
        assert cal.fit["correlation"] > 0.9995
        assert all(0.8 < k < 1.5 for k in cal.kappa.values())
        assert all(0.0 < s < 0.3 for s in cal.widths_A.values())
        assert abs(cal.background) < 0.02 * max(cal.weights_A2.values())


def test_calibration_transfers_to_other_aberrations(prism_defect_cell, calibration_for):
    """Calibrated with an ideal probe, the model holds for defocus and threefold astigmatism."""
    cal = calibration_for(("Mo", "S"))
    for optics in ({"C10_A": -20.0}, {"C10_A": 10.0, "C23_A": 400.0, "phi23_deg": 15.0}):
        atoms, columns, _, ref = prism_defect_cell("Mo", "S", **optics)
        inc = simulate(
            atoms, columns, {"pixel_size_A": 0.2, **optics}, calibration=cal, periodic=True
        )
        occupied = np.asarray(columns.counts).sum(axis=1) > 0
        a = peak_values(inc.image, inc.rows, inc.cols)[occupied]
        b = peak_values(ref.image, ref.rows, ref.cols)[occupied]
        # measured: defocus 20 Å: r = 0.99996, 1.9 %; C23: see docs/physics.md
        assert np.corrcoef(inc.image.ravel(), ref.image.ravel())[0, 1] > 0.999
        assert np.median(np.abs(a - b) / b) < 0.05


def test_serialisation_and_key(toy_calibration):
    cal = toy_calibration
    data = json.loads(json.dumps(cal.to_dict()))
    again = Calibration.from_dict(data)
    assert again == cal and again.key == cal.key
    assert set(cal.key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
    # the key follows what the calibration depends on, not the fit outcome
    other_fit = {**data, "weights_A2": {**data["weights_A2"], "W": 1.0}}
    assert Calibration.from_dict(other_fit).key == cal.key
    for change in ({"energy_kV": 60.0}, {"haadf_inner_mrad": 70.0}, {"elements": ["S", "Mo"]}):
        d = {**data, **change}
        d.pop("key")
        if "elements" in change:
            for table in ("weights_A2", "kappa", "widths_A", "tails_A2"):
                d[table] = {e: d[table][e] for e in change["elements"]}
        assert Calibration.from_dict(d).key != cal.key
    with pytest.raises(ValueError, match="key"):
        Calibration.from_dict({**data, "key": "something-else"})
    with pytest.raises(ValueError, match="version"):
        Calibration.from_dict({**data, "version": 0})
    with pytest.raises(ValueError, match="tails2_A2"):  # version 2 had one tail
        Calibration.from_dict(
            {**data, "key": None, "version": 2, "tails2_A2": {**data["tails2_A2"], "W": 1e-3}}
        )
    # a version-2 calibration (stored in older datasets) still loads under its own key
    old = {k: v for k, v in data.items() if k not in ("key", "tails2_A2", "tail2_width_A")}
    old["version"] = 2
    v2 = Calibration.from_dict(old)
    assert v2.version == 2 and v2.key != cal.key and not v2.tail_terms()
    assert Calibration.from_dict(json.loads(json.dumps(v2.to_dict()))) == v2
    with pytest.raises(ValueError, match="version 1"):  # written before versions were
        Calibration.from_dict({k: v for k, v in data.items() if k != "version"})
    with pytest.raises(ValueError, match="weights_A2"):
        Calibration.from_dict({k: v for k, v in data.items() if k != "weights_A2"})
    with pytest.raises(ValueError, match="widths_A"):
        Calibration.from_dict({**data, "key": None, "widths_A": {**data["widths_A"], "S": -1}})


def test_defocus_fits_interpolate_and_round_trip(toy_calibration):
    """Parameters fitted at other defoci are interpolated linearly, clamped beyond the
    fitted range, and survive the dict round trip (the key does not depend on them)."""
    import dataclasses

    base = toy_calibration
    at_30 = {
        "C10_A": 30.0,
        "weights_A2": {e: 2 * w for e, w in base.weights_A2.items()},
        "kappa": dict(base.kappa),
        "widths_A": dict(base.widths_A),
        "tails_A2": dict(base.tails_A2),
        "tail_width_A": 0.0,
        "background": 3 * base.background,
    }
    cal = dataclasses.replace(base, defocus_fits=(at_30,))
    assert cal.at_defocus(0.0).weights_A2 == pytest.approx(base.weights_A2)
    half = cal.at_defocus(15.0)
    assert half.weights_A2["W"] == pytest.approx(1.5 * base.weights_A2["W"])
    assert half.background == pytest.approx(2 * base.background)
    assert cal.at_defocus(80.0).weights_A2["W"] == pytest.approx(2 * base.weights_A2["W"])
    assert cal.at_defocus(-20.0).weights_A2["W"] == pytest.approx(base.weights_A2["W"])
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.at_defocus(15.0).weights_A2 == pytest.approx(half.weights_A2)
    assert again.key == base.key
    with pytest.raises(ValueError, match="defocus_fits"):
        dataclasses.replace(base, defocus_fits=({"C10_A": 10.0},))


def test_calibration_key_predicts_the_key(calibration_for):
    cal = calibration_for(("Mo", "S"))
    assert calibration_key(None, ["S", "Mo"]) == cal.key
    assert calibration_key({"energy_kV": 80.0, "C10_A": 50.0}, ["Mo", "S"]) == cal.key
    assert calibration_key(None, ["Mo", "S"], reference_model="multislice") != cal.key
    assert calibration_key(None, ["Mo", "S"], interpolation=2) != cal.key
    assert calibration_key(None, ["Mo", "S"], transmission_supersampling=1) != cal.key
    assert calibration_key(None, ["Mo", "S"], defocus_A=(-20.0, 0.0)) != cal.key
    assert calibration_key(None, ["Mo", "S", "Re"], hosts=[("Mo", "S")]) != calibration_key(
        None, ["Mo", "S", "Re"]
    )
    # every pair a host is the default: same cells, same key
    assert calibration_key(None, ["Mo", "S"], hosts=[("Mo", "S")]) == cal.key
    assert calibration_key(None, ["Mo", "S", "Se"]) != cal.key
    assert calibration_key({"semiangle_mrad": 25.0}, ["Mo", "S"]) != cal.key
    with pytest.raises(ValueError, match="reference_model"):
        calibration_key(None, ["Mo", "S"], reference_model="bloch")
    with pytest.raises(ValueError, match="rng"):
        calibration_key(None, ["Mo", "S"], rng=np.random.default_rng(0))


def test_column_weights_apply_channelling(toy_calibration):
    cal = toy_calibration
    counts = np.array([[0, 1], [0, 2], [1, 1], [0, 0]])  # S, S2, SeS... order (Se, S)
    w = cal.column_weights(counts, ("Se", "S"))
    assert w[0] == pytest.approx(cal.weights_A2["S"])
    assert w[1] == pytest.approx(2 * cal.kappa["S"] * cal.weights_A2["S"])
    assert w[2] == pytest.approx(
        cal.kappa["S"] * cal.weights_A2["S"] + cal.kappa["Se"] * cal.weights_A2["Se"]
    )
    assert w[3] == 0.0


def test_periodic_images_cover_the_box():
    # copies of (1, 1) in a 5 x 4 Å cell that fall inside [-6, 9) x [-2, 7)
    idx, x, y = periodic_images(
        np.array([1.0]), np.array([1.0]), (5.0, 4.0), (-6.0, -2.0), (9.0, 7.0)
    )
    assert sorted(zip(x.tolist(), y.tolist(), strict=True)) == [
        (-4.0, 1.0),
        (-4.0, 5.0),
        (1.0, 1.0),
        (1.0, 5.0),
        (6.0, 1.0),
        (6.0, 5.0),
    ]
    assert np.all(idx == 0)


def _toy_grid(base, inner, outer):
    """Calibrations of ``base`` on a detector grid whose weights follow a power law of the
    angles (w ∝ inner^-2 outer^0.3), kappa linear in log(inner angle)."""
    import dataclasses

    from simgen.incoherent import DetectorGrid

    cals = []
    for a in inner:
        for b in outer:
            scale = (a / 60.0) ** -2.0 * (b / 200.0) ** 0.3
            cals.append(
                dataclasses.replace(
                    base,
                    haadf_inner_mrad=a,
                    haadf_outer_mrad=b,
                    weights_A2={e: w * scale for e, w in base.weights_A2.items()},
                    kappa={e: k + 0.05 * np.log(a / 60.0) for e, k in base.kappa.items()},
                )
            )
    return DetectorGrid(tuple(reversed(cals)))  # any order: the grid sorts its nodes


def test_detector_grid_interpolates_between_its_nodes(toy_calibration):
    """A power law of the collection angles is reproduced exactly between nodes, a node
    is returned as it is, the other fields are linear in log(angle), and the grid
    round-trips."""
    from simgen.incoherent import DetectorGrid, calibration_from_dict

    grid = _toy_grid(toy_calibration, (40.0, 60.0, 80.0, 100.0), (150.0, 200.0))
    assert grid.inner_mrad == (40.0, 60.0, 80.0, 100.0) and grid.outer_mrad == (150.0, 200.0)
    node = grid.at_detector(60.0, 200.0)
    assert node == grid.calibrations[3]  # (60, 200): a node is its own calibration
    assert node.weights_A2 == pytest.approx(toy_calibration.weights_A2)
    for a, b in ((50.0, 170.0), (73.0, 200.0), (95.0, 151.0)):
        cal = grid.at_detector(a, b)
        scale = (a / 60.0) ** -2.0 * (b / 200.0) ** 0.3
        for e, w in toy_calibration.weights_A2.items():
            assert cal.weights_A2[e] == pytest.approx(w * scale, rel=1e-9)
        assert cal.kappa["W"] == pytest.approx(toy_calibration.kappa["W"] + 0.05 * np.log(a / 60))
        assert (cal.haadf_inner_mrad, cal.haadf_outer_mrad) == (a, b)
        assert cal.reference["detector_grid"] == grid.key and cal.key != node.key
    again = calibration_from_dict(json.loads(json.dumps(grid.to_dict())))
    assert isinstance(again, DetectorGrid) and again.key == grid.key
    assert again.at_detector(73.0, 180.0) == grid.at_detector(73.0, 180.0)
    with pytest.raises(ValueError, match="haadf_inner_mrad: 130 mrad lies outside"):
        grid.at_detector(130.0, 200.0)
    with pytest.raises(ValueError, match="37.6 mrad lies outside"):  # 2 % of the low end
        grid.at_detector(37.6, 200.0)
    edge = grid.calibrations[1]  # (40, 200): within 2 % below the grid, clamped to it
    assert grid.at_detector(39.5, 200.0).weights_A2 == pytest.approx(edge.weights_A2)
    with pytest.raises(ValueError, match="haadf_outer_mrad"):
        grid.at_detector(60.0, 260.0)


def test_detector_grid_refuses_mixed_or_incomplete_nodes(toy_calibration):
    import dataclasses

    from simgen.incoherent import DetectorGrid

    grid = _toy_grid(toy_calibration, (40.0, 60.0), (150.0, 200.0))
    with pytest.raises(ValueError, match="full grid"):
        DetectorGrid(grid.calibrations[:3])
    other = dataclasses.replace(grid.calibrations[0], energy_kV=60.0)
    with pytest.raises(ValueError, match="share elements, energy"):
        DetectorGrid((other, *grid.calibrations[1:]))
    data = grid.to_dict()
    with pytest.raises(ValueError, match="stored key"):
        DetectorGrid.from_dict({**data, "key": "grid-x"})


def test_detector_grid_nodes_cover_the_drawn_range():
    from simgen.incoherent import detector_grid_nodes

    assert detector_grid_nodes((60.0, 60.0), (200.0, 200.0)) == ((60.0,), (200.0,))
    assert detector_grid_nodes((45.0, 110.0), (200.0, 200.0)) == (
        (40.0, 60.0, 80.0, 100.0, 120.0),
        (200.0,),
    )
    assert detector_grid_nodes((40.0, 120.0), (160.0, 240.0))[1] == (150.0, 200.0, 250.0)
    with pytest.raises(ValueError, match=">= 20 mrad"):
        detector_grid_nodes((10.0, 60.0), (200.0, 200.0))
    with pytest.raises(ValueError, match="below its outer nodes"):
        detector_grid_nodes((40.0, 150.0), (160.0, 200.0))


# -- slow -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vacancy_contrast_matches_converged_prism():
    """Calibrated as simgen calibrates, the incoherent model reads the empty sites of
    ordinary WSe2 lattice as converged PRISM does: empty W site / hexagon centre and empty
    Se site / hexagon centre within 3 % in focus (one tail: +4.9 % for the W vacancy), the
    metal and single-vacancy contrasts within 1.5 %, image correlation >= 0.999; at
    ±30 Å defocus every ratio within 4 %, the single vacancy's remaining atom on either
    side included (the probe refocused to its height; -7.4 % without). A cell the
    calibration never saw; ~4 min on 2 cores."""
    from scipy.ndimage import map_coordinates

    from simgen.calibrate import calibrate, hollow_sites
    from simgen.optics import ideal_optics
    from simgen.simulation import simulate_defocus_series

    optics = ideal_optics(energy_kV=80.0, semiangle_mrad=30.0, haadf_inner_mrad=60.0,
                          haadf_outer_mrad=200.0)  # fmt: skip
    atoms, columns, kinds = isolated_vacancy_cell("W", "Se", n_empty=4, repeats=(4, 3), rng=13)
    p = 0.1
    c10s = (0.0, -30.0, 30.0)
    refs = simulate_defocus_series(
        atoms, columns, {**optics, "pixel_size_A": p}, list(c10s), model="prism",
        interpolation=1, periodic=True,
    )  # fmt: skip
    cal = calibrate(optics, ("W", "Se"))
    hollow = hollow_sites(atoms.cell.lengths()[0] / 4, (4, 3))

    def means(image):
        img = np.asarray(image, dtype=np.float64)

        def at(x, y):
            return map_coordinates(img, [np.asarray(y) / p, np.asarray(x) / p], order=3,
                                   mode="grid-wrap")  # fmt: skip

        v = at(columns.x, columns.y)
        out = {k: float(np.mean(v[kinds == k])) for k in set(kinds.tolist())}
        out["hollow"] = float(np.mean(at(hollow[:, 0], hollow[:, 1])))
        return out

    ratios = (
        ("empty_M", "hollow"), ("empty_X", "hollow"), ("W", "Se2"), ("Se_entry", "Se2"),
        ("Se_exit", "Se2"),
    )  # fmt: skip
    for c10, ref in zip(c10s, refs, strict=True):
        opt = {**optics, "pixel_size_A": p, "C10_A": c10}
        fast = simulate(atoms, columns, opt, calibration=cal, periodic=True)
        a, b = means(ref.image), means(fast.image)
        errors = {f"{n}/{d}": (b[n] / b[d]) / (a[n] / a[d]) - 1.0 for n, d in ratios}
        if c10 == 0.0:
            assert abs(errors["empty_M/hollow"]) < 0.03, errors
            assert abs(errors["empty_X/hollow"]) < 0.03, errors
            assert all(abs(errors[k]) < 0.015 for k in list(errors)[2:]), errors
        else:
            # the goal is 4 %; measured -3.9 % (entrance-side atom at -30 Å); 0.2 % margin
            # for the fit's last digits, which vary with thread-parallel FFTs
            assert all(abs(e) < 0.042 for e in errors.values()), (c10, errors)
        r = np.corrcoef(np.ravel(ref.image), np.ravel(fast.image))[0, 1]
        assert r > 0.999
