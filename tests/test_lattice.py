"""FFT pixel-size calibration, sublattice fit, empty sites and the site constraint.

Test images are rendered here (not with simgen's simulator): a Gaussian (σ = 0.45 Å) per
projected column of a ``structures`` monolayer, weight Σ Z^1.7 over the column's atoms,
then Poisson noise. ``render_haadf`` is also imported by the other test modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.data import atomic_numbers
from scipy import ndimage

from simgen.experiment.calibration import (
    CalibrationError,
    calibrate_lattice,
    calibrate_pixel_size,
    find_lattice_spots,
)
from simgen.experiment.lattice import (
    UNASSIGNED,
    allowed_sites,
    apply_site_constraint,
    assign_sublattices,
    constrain_probabilities,
    decide_metal_sublattice,
    fit_lattice,
    metal_is_brighter,
    scheme_names,
)
from structures import (
    CHALCOGEN,
    LATTICE_TABLE,
    METAL,
    apply_defects,
    build_monolayer,
    column_table,
    get_scheme,
    parse_material,
)


def render_haadf(
    material="MoS2",
    pixel_size=0.2,
    shape=(256, 256),
    rotation_deg=0.0,
    *,
    dose=20.0,
    sigma_A=0.45,
    ml=None,
    distort=None,
    rng=0,
):
    """HAADF-like image of a 2H monolayer: Gaussians at the columns, weight Σ Z^1.7, Poisson.

    Returns ``(image [H, W] float32, column table, monolayer, (col, row) px of every column)``.
    ``distort(col, row) -> (col, row)`` moves the columns (scan distortion) before rendering.
    """
    rng = np.random.default_rng(rng)
    h, w = shape
    if ml is None:
        ml = build_monolayer(
            material, fov=(w * pixel_size, h * pixel_size), rotation_deg=rotation_deg, margin=3.0
        )
    table = column_table(ml)
    weight = table.counts @ (np.array([atomic_numbers[e] for e in table.elements]) ** 1.7)
    x0, y0 = ml.fov_origin
    col, row = (table.x - x0) / pixel_size, (table.y - y0) / pixel_size
    if distort is not None:
        col, row = distort(col, row)
    img = np.zeros((h + 2, w + 2))
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = col - c0, row - r0
    for dr, dc, share in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        r, c = r0 + dr + 1, c0 + dc + 1
        ok = (r >= 0) & (r < h + 2) & (c >= 0) & (c < w + 2)
        np.add.at(img, (r[ok], c[ok]), (weight * share)[ok])
    img = ndimage.gaussian_filter(img, sigma_A / pixel_size)[1:-1, 1:-1]
    img = img / img.mean() * dose
    if dose:
        img = rng.poisson(img)
    return img.astype(np.float32), table, ml, (col, row)


def lattice_constant(material):
    return LATTICE_TABLE[parse_material(material)][0]


# ------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "material, pixel, rotation",
    [("MoS2", 0.12, 0.0), ("WSe2", 0.2, 17.0), ("MoSe2", 0.31, 43.0), ("MoTe2", 0.25, 30.0)],
)
def test_fft_calibration_within_2_percent(material, pixel, rotation):
    img, *_ = render_haadf(material, pixel, (384, 384), rotation, dose=10.0)
    estimate, uncertainty = calibrate_pixel_size(img, lattice_constant(material))
    assert abs(estimate / pixel - 1) < 0.02
    assert abs(estimate / pixel - 1) < 0.005  # what it achieves: ~0.1 %
    assert 0 < uncertainty < 0.01 * pixel
    spots = find_lattice_spots(img)
    assert spots.orders >= 3  # {110} spots at a/2 used beyond the first order
    h, k = spots.hkl.T
    first = np.linalg.norm(spots.spots[h * h + h * k + k * k == 1], axis=1)
    assert len(first) == 6
    np.testing.assert_allclose(
        first, pixel / (lattice_constant(material) * math.sqrt(3) / 2), rtol=0.005
    )  # fmt: skip  (d100 = a√3/2)
    assert math.isclose(spots.rotation_deg % 60, rotation % 60, abs_tol=0.5) or math.isclose(
        abs(spots.rotation_deg - rotation % 60), 60, abs_tol=0.5
    )


def test_fft_calibration_non_square_image_and_stack():
    a = lattice_constant("WS2")
    img, *_ = render_haadf("WS2", 0.18, (200, 320), 8.0, dose=5.0)
    est, _ = calibrate_pixel_size(img, a)
    assert abs(est / 0.18 - 1) < 0.02
    # a stack whose frames drift: power spectra are averaged, so the drift does not matter
    frames = np.stack([np.roll(img, (3 * k, -2 * k), axis=(0, 1)) for k in range(3)])
    est_stack, _ = calibrate_pixel_size(frames, a)
    assert abs(est_stack / 0.18 - 1) < 0.02


def test_fft_calibration_measures_scan_distortion():
    # 4 % compression along the slow scan (y): the fast-scan pixel size stays the microscope's
    # calibration and the anisotropy p_y/p_x - 1 = 1/0.96 - 1 is measured, not averaged in
    img, *_ = render_haadf("MoS2", 0.2, (384, 384), 10.0, distort=lambda c, r: (c, 0.96 * r))
    cal = calibrate_lattice(img, lattice_constant("MoS2"))
    assert abs(cal.pixel_size_A / 0.2 - 1) < 0.003
    assert cal.pixel_size_x_A == cal.pixel_size_A
    assert abs(cal.pixel_size_y_A / (0.2 / 0.96) - 1) < 0.003
    assert abs(cal.anisotropy - (1 / 0.96 - 1)) < 0.003
    assert abs(cal.shear) < 0.003
    assert cal.distorted
    est, unc = calibrate_pixel_size(img, lattice_constant("MoS2"))
    assert est == cal.pixel_size_A and 0 < unc < 0.01 * est


def test_fft_calibration_fails_without_a_hexagonal_lattice():
    rng = np.random.default_rng(0)
    noise = rng.poisson(20.0, (256, 256)).astype(np.float32)
    with pytest.raises(CalibrationError, match="hexagonal"):
        calibrate_pixel_size(noise, 3.16)
    yy, xx = np.mgrid[:256, :256]
    square = (np.cos(2 * np.pi * xx / 9.0) + np.cos(2 * np.pi * yy / 9.0)).astype(np.float32)
    with pytest.raises(CalibrationError):
        calibrate_pixel_size(square + 3, 3.16)
    with pytest.raises(ValueError, match="lattice_constant_A"):
        calibrate_pixel_size(noise, -1.0)


# ------------------------------------------------------------------------------ sublattices


def distorted_positions(material, rotation, *, missing=0.05, noise_px=0.3, rng=0):
    """Column positions of a 150 Å field at 0.2 Å/px with shear, contraction and nonlinear
    drift, a fraction ``missing`` removed, and detection noise. Returns (xy, true site)."""
    rng = np.random.default_rng(rng)
    ml = build_monolayer(material, fov=(150.0, 150.0), rotation_deg=rotation, margin=0.0)
    t = column_table(ml)
    x, y = t.x / 0.2, t.y / 0.2
    period = 750.0
    x2 = x + 0.06 * y + 4.0 * np.sin(2 * np.pi * 1.5 * y / period)
    y2 = 0.95 * y + 3.0 * np.sin(2 * np.pi * x / period)
    keep = rng.random(len(x)) > missing
    xy = np.column_stack([x2, y2])[keep] + rng.normal(0.0, noise_px, (keep.sum(), 2))
    return xy, t.site[keep]


@pytest.mark.parametrize("material, rotation", [("MoS2", 0.0), ("MoSe2", 47.0)])
def test_sublattices_by_topology_on_a_distorted_lattice(material, rotation):
    xy, truth = distorted_positions(material, rotation)
    fit = assign_sublattices(xy)
    s = fit.sublattice
    # the topological labels 0/1 are defined up to a swap
    accuracy = max(np.mean(s == truth), np.mean(s == 1 - truth))
    assert accuracy >= 0.99
    assert np.mean(s == UNASSIGNED) < 0.005
    b_true = 3.16 / math.sqrt(3) / 0.2 if material == "MoS2" else 3.289 / math.sqrt(3) / 0.2
    assert abs(fit.bond_length_px / b_true - 1) < 0.06  # distortion changes it by a few %


def test_adatom_in_a_hollow_is_not_placed_on_the_lattice():
    ml = build_monolayer("MoS2", fov=(60.0, 60.0), rotation_deg=11.0, margin=0.0)
    t = column_table(ml)
    xy = np.column_stack([t.x, t.y]) / 0.2
    metals = xy[t.site == METAL]
    centre = metals[np.argmin(np.linalg.norm(metals - metals.mean(axis=0), axis=1))]
    th = math.radians(11.0)
    a = 3.16 / 0.2
    a1 = a * np.array([math.cos(th), math.sin(th)])
    a2 = a * np.array([math.cos(th + math.pi / 3), math.sin(th + math.pi / 3)])
    hollow = centre + 2 * (a1 + a2) / 3  # centre of a hexagon: b from six columns
    fit = assign_sublattices(np.vstack([xy, hollow]))
    assert fit.sublattice[-1] == UNASSIGNED
    assert fit.site_residual_px[-1] > 0.8 * fit.bond_length_px
    a1, a2 = fit.lattice_vectors_px
    np.testing.assert_allclose(np.linalg.norm([a1, a2], axis=1), a, rtol=1e-3)
    assert math.degrees(math.acos(a1 @ a2 / (a * a))) == pytest.approx(60.0, abs=0.1)
    truth, s = t.site, fit.sublattice[:-1]
    assert max(np.mean(s == truth), np.mean(s == 1 - truth)) == 1.0


def detected_columns(material="WSe2", defects=None, rotation=17.0, size=400, pixel=0.2):
    ml = build_monolayer(material, fov=(size * pixel, size * pixel), rotation_deg=rotation)
    if defects:
        ml = apply_defects(ml, defects, by="count", rng=3)
    img, t, ml, (col, row) = render_haadf(material, pixel, (size, size), ml=ml)
    inside = (col >= -0.5) & (col < size - 0.5) & (row >= -0.5) & (row < size - 0.5)
    return img, t, np.column_stack([col, row]), inside


def test_fit_lattice_names_the_metal_sublattice_from_intensity():
    for material in ("WSe2", "MoTe2"):  # metal brighter / chalcogen pair brighter
        img, t, xy, inside = detected_columns(material, size=300)
        occ = inside & (t.n_atoms > 0)
        fit = fit_lattice(xy[occ], image=img, material=material)
        assert fit.metal_rule == "intensity"
        assert np.mean(fit.site == t.site[occ]) >= 0.99
    assert metal_is_brighter("WSe2") and metal_is_brighter("MoS2")
    assert not metal_is_brighter("MoTe2")


def test_empty_sites_found_where_vacancies_are():
    img, t, xy, inside = detected_columns("WSe2", {"vac_X2": 6, "vac_M": 4})
    occ = inside & (t.n_atoms > 0)
    fit = fit_lattice(xy[occ], image=img, material="WSe2", image_shape=img.shape)
    assert np.mean(fit.site == t.site[occ]) == 1.0
    b = fit.bond_length_px
    empty = (t.n_atoms == 0) & inside
    e_xy, e_site = xy[empty], t.site[empty]
    interior = np.all((e_xy > b) & (e_xy < 400 - 1 - b), axis=1)
    # every interior vacancy is found, on the right sublattice, and nothing else is
    assert len(fit.empty_xy) == interior.sum() >= 8
    for p, s in zip(e_xy[interior], e_site[interior], strict=True):
        d = np.linalg.norm(fit.empty_xy - p, axis=1)
        k = int(np.argmin(d))
        assert d[k] < 0.2 * b
        assert fit.empty_site[k] == s
        assert fit.empty_support[k] >= 3
    # a mask over part of the image removes the empty sites outside it
    mask = np.zeros(img.shape, dtype=bool)
    mask[:, :200] = True
    masked = fit_lattice(xy[occ], image=img, material="WSe2", mask=mask)
    assert np.all(masked.empty_xy[:, 0] < 200.5)
    assert len(masked.empty_xy) == np.sum(fit.empty_xy[:, 0] < 199.5)


# ------------------------------------------------------------------------ site constraint


def test_allowed_sites_of_the_presets():
    d = allowed_sites("defects")
    assert d["background"] == ()
    for name in ("metal", "vac_M", "antisite_X1", "antisite_X2", "dopant_M"):
        assert d[name] == (METAL,)
    for name in ("chalcogen", "vac_X1", "vac_X2", "sub_X1", "sub_X2"):
        assert d[name] == (CHALCOGEN,)
    c = allowed_sites("composition")
    assert c["Mo"] == c["W"] == c["vac_M"] == c["other"] == (METAL,)
    for name in ("S2", "SSe", "STe", "Se2", "SeTe", "Te2", "S", "Se", "Te", "vac_X"):
        assert c[name] == (CHALCOGEN,)
    a = allowed_sites("atoms")
    assert a == {"background": (), "metal": (METAL,), "chalcogen": (CHALCOGEN,)}
    # a store's {"ids", "names"} and a training.stores-like object give the same table
    stored = {"ids": [0, 1, 2], "names": ["background", "metal", "chalcogen"]}
    assert allowed_sites(stored) == a
    assert scheme_names(get_scheme("defects")) == get_scheme("defects").names


def test_allowed_sites_of_custom_schemes():
    custom = {
        "name": "vacancies",
        "by": "defect",
        "classes": {
            "V_S": ["vac_X1", "sub_X1"],
            "V_Mo": ["vac_M"],
            "mixed": ["vac_X2", "dopant_M"],
            "pristine": ["none"],
        },
    }
    s = allowed_sites(custom)
    assert s["V_S"] == (CHALCOGEN,)
    assert s["V_Mo"] == (METAL,)
    assert s["mixed"] == (METAL, CHALCOGEN)
    assert s["pristine"] == (METAL, CHALCOGEN)
    comp = {"name": "c", "by": "composition", "classes": {"heavy": ["Te2", "SeTe"], "dop": ["Re"]}}
    assert allowed_sites(comp) == {"background": (), "heavy": (CHALCOGEN,), "dop": (METAL,)}
    lee = {
        "ids": list(range(7)),
        "names": [
            "background",
            "1Doped",
            "2Doped",
            "1vacancy",
            "2vacancy",
            "metal_vacancy",
            "metal_Doped",
        ],
    }
    s = allowed_sites(lee)
    assert s["2vacancy"] == (CHALCOGEN,) and s["metal_Doped"] == (METAL,)
    assert allowed_sites({"ids": [0, 1], "names": ["background", "blob"]})["blob"] == (0, 1)


def test_constraint_corrects_a_planted_wrong_site_class():
    names = get_scheme("defects").names
    k = {n: i for i, n in enumerate(names)}
    probs = np.full((4, len(names)), 0.01)
    # a chalcogen column the network calls vac_M (a metal-site class), vac_X1 second
    probs[0, k["vac_M"]], probs[0, k["vac_X1"]] = 0.6, 0.3
    # a metal column the network calls chalcogen, dopant second
    probs[1, k["chalcogen"]], probs[1, k["dopant_M"]] = 0.7, 0.2
    # a correct one, and an unplaced column keeping its best non-background class
    probs[2, k["vac_X2"]] = 0.9
    probs[3, 0], probs[3, k["sub_X1"]] = 0.8, 0.15
    site = np.array([CHALCOGEN, METAL, CHALCOGEN, UNASSIGNED])
    out = apply_site_constraint(probs, site, "defects")
    assert [names[c] for c in out] == ["vac_X1", "dopant_M", "vac_X2", "sub_X1"]
    without = np.argmax(probs, axis=1)
    assert [names[c] for c in without[:2]] == ["vac_M", "chalcogen"]
    q = constrain_probabilities(probs, site, "defects")
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    assert q[0, k["vac_M"]] == 0 and q[1, k["chalcogen"]] == 0 and np.all(q[:, 0] == 0)
    with pytest.raises(ValueError, match="probs"):
        apply_site_constraint(probs[:, :5], site, "defects")


def test_metal_sublattice_from_probabilities_beats_brightness():
    # MoSe2: metal and chalcogen columns similar in brightness; the probabilities decide
    rng = np.random.default_rng(4)
    img, t, xy, inside = detected_columns("MoSe2", size=260, rotation=5.0)
    occ = inside & (t.n_atoms > 0)
    truth = t.site[occ]
    names = get_scheme("defects").names
    probs = rng.dirichlet(np.ones(len(names)) * 0.3, size=occ.sum())
    hit = rng.random(occ.sum()) < 0.7  # 70 % of columns get their true host class on top
    probs[hit, np.where(truth[hit] == METAL, 1, 2)] += 2.0
    probs /= probs.sum(axis=1, keepdims=True)
    fit = fit_lattice(xy[occ], probs=probs, scheme="defects")
    assert fit.metal_rule == "probabilities"
    assert np.mean(fit.site == truth) >= 0.99
    # the constraint then puts only metal-site classes on metal sites and vice versa
    metal_classes = [
        names.index(n) for n in ("metal", "vac_M", "antisite_X1", "antisite_X2", "dopant_M")
    ]
    raw = np.argmax(probs, axis=1)
    assert np.any((fit.site == METAL) & ~np.isin(raw, metal_classes))  # errors were there
    classes = apply_site_constraint(probs, fit.site, "defects")
    assert np.all(np.isin(classes[fit.site == METAL], metal_classes))
    assert not np.any(np.isin(classes[fit.site == CHALCOGEN], metal_classes + [0]))


def test_decide_metal_sublattice_needs_information():
    with pytest.raises(ValueError, match="probs"):
        decide_metal_sublattice(np.array([0, 1, 0]))
    metal, rule, _ = decide_metal_sublattice(
        np.array([0, 1, 0, 1]), intensities=np.array([1.0, 5.0, 1.2, 4.0]), material="MoTe2"
    )
    assert (metal, rule) == (0, "intensity")  # Te2 brighter than Mo: the dim sublattice
