"""Builder tests: lattice geometry, stoichiometry, defects, column tables, schemes."""

import math
import time

import numpy as np
import pytest
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list

from structures import (
    CHALCOGEN,
    DEFECT_KINDS,
    LATTICE_TABLE,
    METAL,
    apply_defects,
    build_monolayer,
    column_table,
    columns_from_atoms,
    get_scheme,
    lattice_parameters,
    make_composition,
)


@pytest.mark.parametrize(("metal", "chalcogen"), list(LATTICE_TABLE))
def test_pristine_lattice_constant_and_stoichiometry(metal, chalcogen):
    ml = build_monolayer(f"{metal}{chalcogen}2", fov=(20, 20), margin=0, rng=0)
    a, d = LATTICE_TABLE[(metal, chalcogen)]
    symbols = np.array(ml.atoms.get_chemical_symbols())
    n_m, n_x = (symbols == metal).sum(), (symbols == chalcogen).sum()
    # a cropped window is stoichiometric in the bulk: two chalcogens per chalcogen site,
    # and as many chalcogen as metal sites up to the columns cut at the edge
    n_sites_x = (ml.sites.sublattice == CHALCOGEN).sum()
    assert n_x == 2 * n_sites_x
    assert abs(n_sites_x - n_m) <= 4 * 20 / a
    # nearest metal-metal distance is a; metal-chalcogen bond from a and d
    pos = ml.atoms.positions
    metals = pos[symbols == metal]
    dmm = np.linalg.norm(metals[:, None, :2] - metals[None, :, :2], axis=-1)
    np.fill_diagonal(dmm, np.inf)
    assert dmm.min() == pytest.approx(a, rel=1e-9)
    z = pos[symbols == chalcogen, 2]
    assert z.max() - z.min() == pytest.approx(d, rel=1e-9)
    _, _, dist = neighbor_list("ijd", ml.atoms, 1.2 * math.hypot(a / math.sqrt(3), d / 2))
    assert dist.min() == pytest.approx(math.hypot(a / math.sqrt(3), d / 2), rel=1e-9)


def test_metal_density_matches_area():
    ml = build_monolayer("MoS2", fov=(60, 50), margin=0, rng=0)
    a = ml.lattice_constant
    n_metal = (ml.sites.sublattice == METAL).sum()
    expected = 60 * 50 / (a * a * math.sqrt(3) / 2)
    assert abs(n_metal - expected) / expected < 0.05


def test_vegard_alloy_and_fractions():
    comp = make_composition(metals={"Mo": 0.25, "W": 0.75}, chalcogens={"S": 0.4, "Se": 0.6})
    a, d = lattice_parameters(comp)
    expect = sum(
        fm * fx * LATTICE_TABLE[(m, x)][0] for m, fm in comp.metals for x, fx in comp.chalcogens
    )
    assert a == pytest.approx(expect)
    assert LATTICE_TABLE[("Mo", "S")][0] < a < LATTICE_TABLE[("W", "Se")][0]
    ml = build_monolayer(
        None, fov=40, metals={"Mo": 0.25, "W": 0.75}, chalcogens={"S": 0.4, "Se": 0.6}, rng=3
    )
    sym = np.array(ml.atoms.get_chemical_symbols())
    n_m = np.isin(sym, ["Mo", "W"]).sum()
    n_x = np.isin(sym, ["S", "Se"]).sum()
    assert abs((sym == "W").sum() / n_m - 0.75) < 1 / n_m + 1e-9
    assert abs((sym == "Se").sum() / n_x - 0.6) < 1 / n_x + 1e-9
    table = column_table(ml, "composition")
    names = {table.scheme.names[c] for c in np.unique(table.class_id)}
    assert {"Mo", "W", "S2", "SSe", "Se2"} <= names


def test_rotation_keeps_bonds_and_whole_columns():
    ref = build_monolayer("WSe2", fov=30, rng=0)
    for angle in (7.0, 30.0, 53.3):
        ml = build_monolayer("WSe2", fov=30, rotation_deg=angle, rng=0)
        _, _, d = neighbor_list("ijd", ml.atoms, 2.7)
        _, _, d0 = neighbor_list("ijd", ref.atoms, 2.7)
        assert d.min() == pytest.approx(d0.min(), rel=1e-9)
        assert d.max() == pytest.approx(d0.max(), rel=1e-9)
        table = column_table(ml)
        full = table.site == CHALCOGEN
        assert np.all(table.n_atoms[full] == 2) and np.all(table.n_atoms[~full] == 1)


def test_displacement_noise_sigma():
    ml0 = build_monolayer("MoS2", fov=60, rng=5)
    ml = build_monolayer("MoS2", fov=60, displacement_sigma=0.05, rng=5)
    diff = ml.atoms.positions - ml0.atoms.positions
    assert diff.std() == pytest.approx(0.05, rel=0.1)


def test_exact_counts_acceptance_cell_under_a_second():
    t0 = time.perf_counter()
    ml = build_monolayer("WSe2", fov=(100, 100), rng=0)
    n_x = int(((ml.sites.sublattice == CHALCOGEN) & ml.in_fov).sum())
    n_m = int(((ml.sites.sublattice == METAL) & ml.in_fov).sum())
    want = {
        "vac_X1": round(0.03 * n_x),
        "vac_X2": round(0.005 * n_x),
        "vac_M": round(0.002 * n_m),
        "sub_X1": round(0.005 * n_x),
    }
    ml = apply_defects(ml, want, by="count", substituent="Te", rng=1)
    table = column_table(ml)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert table.count_defects() == want


def test_vacancies_remove_exactly_the_right_atoms():
    ml = build_monolayer("MoS2", fov=40, rng=0)
    n0 = len(ml.atoms)
    counts = {"vac_X1": 7, "vac_X2": 5, "vac_M": 3}
    out = apply_defects(ml, counts, by="count", rng=2)
    assert len(out.atoms) == n0 - 7 - 2 * 5 - 3
    table = column_table(out)
    assert np.all(table.n_atoms[table.defect == "vac_X1"] == 1)
    assert np.all(table.n_atoms[table.defect == "vac_X2"] == 0)
    assert np.all(table.n_atoms[table.defect == "vac_M"] == 0)
    # emptied sites remain in the table at their lattice positions
    assert len(table) == len(ml.sites)


def test_substitutions_antisites_dopants_and_complexes():
    ml = build_monolayer("WSe2", fov=50, rng=0)
    spec = {
        "sub_X1": 4,
        "sub_X2": 4,
        "antisite_X1": 3,
        "antisite_X2": 3,
        "dopant_M": 5,
        "vac_complex": 2,
    }
    out = apply_defects(ml, spec, by="count", substituent="Te", dopant="V", complex_size=2, rng=4)
    t = column_table(out)
    assert set(t.composition[t.defect == "sub_X1"]) == {"SeTe"}
    assert set(t.composition[t.defect == "sub_X2"]) == {"Te2"}
    assert set(t.composition[t.defect == "antisite_X1"]) == {"Se"}
    assert set(t.composition[t.defect == "antisite_X2"]) == {"Se2"}
    assert set(t.composition[t.defect == "dopant_M"]) == {"V"}
    assert np.all(t.site[t.defect == "antisite_X2"] == METAL)
    counts = t.count_defects()
    assert counts["vac_complex"] == 2
    for cid in np.unique(t.complex_id[t.complex_id >= 0]):
        members = t.complex_id == cid
        assert (t.defect[members] == "vac_M").sum() == 1
        assert (t.defect[members] == "vac_X1").sum() == 2
        metal = np.flatnonzero(members & (t.defect == "vac_M"))[0]
        d = np.hypot(t.x[members] - t.x[metal], t.y[members] - t.y[metal])
        assert d.max() < out.lattice_constant / math.sqrt(3) * 1.1  # adjacent


def test_concentrations_are_statistically_right():
    ml = build_monolayer("MoS2", fov=80, rng=0)
    n_x = int(((ml.sites.sublattice == CHALCOGEN) & ml.in_fov).sum())
    c = 0.05
    got = [
        column_table(apply_defects(ml, {"vac_X1": c}, rng=s)).count_defects().get("vac_X1", 0)
        for s in range(40)
    ]
    mean, sd = np.mean(got), math.sqrt(n_x * c * (1 - c))
    assert abs(mean - n_x * c) < 4 * sd / math.sqrt(len(got))
    assert np.std(got) == pytest.approx(sd, rel=0.35)


def test_no_two_defects_on_one_column():
    ml = build_monolayer("MoS2", fov=30, rng=0)
    out = apply_defects(ml, {"vac_X1": 0.5, "sub_X1": 0.5}, by="exact", rng=1)
    t = column_table(out)
    chalc = (t.site == CHALCOGEN) & t.in_fov
    assert (t.defect[chalc] == "none").sum() <= 1  # every column took at most one defect
    assert set(np.unique(t.defect[chalc])) <= {"vac_X1", "sub_X1", "none"}


def test_same_seed_same_structure_different_seed_differs():
    kw = dict(fov=40, displacement_sigma=0.02)
    spec = {"vac_X1": 0.05, "vac_M": 0.02}
    a = apply_defects(build_monolayer("MoS2", rng=1, **kw), spec, rng=2)
    b = apply_defects(build_monolayer("MoS2", rng=1, **kw), spec, rng=2)
    c = apply_defects(build_monolayer("MoS2", rng=1, **kw), spec, rng=3)
    assert np.array_equal(a.atoms.positions, b.atoms.positions)
    assert list(a.sites.defect) == list(b.sites.defect)
    assert list(a.sites.defect) != list(c.sites.defect)


def test_column_table_consistent_with_atoms():
    ml = apply_defects(
        build_monolayer("WSe2", fov=30, rng=0),
        {"vac_X1": 0.05, "sub_X1": 0.05, "vac_M": 0.03},
        rng=1,
    )
    t = column_table(ml)
    col = ml.atoms.arrays["column"]
    assert t.n_atoms.sum() == len(ml.atoms)  # every atom in exactly one column
    assert np.array_equal(np.bincount(col, minlength=len(t)), t.n_atoms)
    z_sum = (t.counts * np.array([atomic_numbers[e] for e in t.elements])).sum()
    assert z_sum == ml.atoms.numbers.sum()
    occupied = t.n_atoms > 0
    for k in np.flatnonzero(occupied)[:50]:
        p = ml.atoms.positions[col == k, :2]
        assert np.allclose(p.mean(axis=0), [t.x[k], t.y[k]])


def test_columns_from_atoms_recovers_builder_table():
    ml = build_monolayer("MoSe2", fov=40, rotation_deg=21, displacement_sigma=0.02, rng=0)
    ml = apply_defects(
        ml,
        {"vac_X1": 6, "vac_X2": 4, "vac_M": 3, "sub_X1": 3, "antisite_X2": 2, "dopant_M": 2},
        by="count",
        dopant="Nb",
        rng=1,
    )
    ref = column_table(ml).count_defects(only_fov=False)
    derived = columns_from_atoms(ml.atoms).count_defects(only_fov=False)
    assert derived == ref


def test_label_schemes_stable_ids():
    d = get_scheme("defects")
    assert d.names[:3] == ("background", "metal", "chalcogen")
    assert d.class_of("vac_X1") == 3
    assert get_scheme("atoms").names == ("background", "metal", "chalcogen")
    c = get_scheme("composition")
    assert c.names[0] == "background" and "SSe" in c.names and "vac_X" in c.names
    custom = get_scheme(
        {
            "name": "vac",
            "by": "defect",
            "classes": {"metal": [], "chalcogen": [], "vacancy": ["vac_X1", "vac_X2", "vac_M"]},
        }
    )
    t = column_table(
        apply_defects(build_monolayer("MoS2", fov=30, rng=0), {"vac_X1": 3}, by="count", rng=0),
        custom,
    )
    assert set(t.class_id[t.defect == "vac_X1"]) == {3}
    assert get_scheme(custom.to_dict()) == custom


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda: build_monolayer("MoXx2"), "material"),
        (lambda: build_monolayer(None, metals={"Mo": 1.2}, chalcogens={"S": 1.0}), "metals"),
        (lambda: build_monolayer(None, metals={"Cu": 1.0}, chalcogens={"S": 1.0}), "metals"),
        (
            lambda: build_monolayer(None, metals={"Mo": 1}, chalcogens={"S": 0.5, "Se": 0.6}),
            "chalcogens",
        ),
        (lambda: build_monolayer("MoS2", fov=(3.0, 30.0)), "fov"),
        (lambda: apply_defects(build_monolayer("MoS2"), {"vac_X1": 0.7, "sub_X1": 0.5}), "defects"),
        (lambda: apply_defects(build_monolayer("MoS2"), {"vac_X1": 1.5}), "defects.vac_X1"),
        (lambda: apply_defects(build_monolayer("MoS2"), {"holes": 0.1}), "defects"),
        (lambda: apply_defects(build_monolayer("MoS2"), {"dopant_M": 0.1}, dopant="Xq"), "dopant"),
        (lambda: get_scheme("nonsense"), "scheme"),
        (lambda: build_monolayer("MoS2", displacement_sigma=-1), "displacement_sigma"),
    ],
)
def test_bad_input_names_the_parameter(call, param):
    with pytest.raises(ValueError, match=param):
        call()


def test_all_defect_kinds_documented():
    assert set(DEFECT_KINDS) == {
        "vac_X1",
        "vac_X2",
        "vac_M",
        "sub_X1",
        "sub_X2",
        "antisite_X1",
        "antisite_X2",
        "dopant_M",
        "vac_complex",
    }


def test_composition_scheme_puts_antisites_in_other():
    ml = apply_defects(
        build_monolayer("WSe2", fov=30, rng=0),
        {"antisite_X1": 2, "antisite_X2": 2, "vac_M": 1, "vac_X2": 1},
        by="count",
        rng=0,
    )
    t = column_table(ml, "composition")
    names = np.array(t.scheme.names)[t.class_id]
    assert set(names[np.isin(t.defect, ["antisite_X1", "antisite_X2"])]) == {"other"}
    assert set(names[t.defect == "vac_M"]) == {"vac_M"}
    assert set(names[t.defect == "vac_X2"]) == {"vac_X"}
    assert set(names[(t.defect == "none") & (t.site == METAL)]) == {"W"}
