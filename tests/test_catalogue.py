"""Column catalogue: concentration arithmetic, files, and the lattice → catalogue step."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_lattice import detected_columns

from simgen.experiment.lattice import UNASSIGNED, fit_lattice
from structures import CHALCOGEN, METAL, get_scheme
from training.experiments.catalogue import (
    COLUMN_FIELDS,
    build_catalogue,
    catalogue_from_lattice,
    defect_class_names,
    flatten_summary,
    read_columns_csv,
    summarize,
    vacancy_class,
    write_columns_csv,
    write_run_summary_csv,
    write_summary_json,
)

NAMES = get_scheme("defects").names
ID = {n: i for i, n in enumerate(NAMES)}


def hand_built():
    """200 × 100 px at 0.5 Å/px (100 × 50 Å = 50 nm²): 10 metal sites (8 metal, 2 vac_M
    empty), 20 chalcogen sites (15 chalcogen, 3 vac_X1, 2 vac_X2 empty), 1 unassigned."""
    rows = (
        [("metal", METAL, True)] * 8
        + [("vac_M", METAL, False)] * 2
        + [("chalcogen", CHALCOGEN, True)] * 15
        + [("vac_X1", CHALCOGEN, True)] * 3
        + [("vac_X2", CHALCOGEN, False)] * 2
        + [("metal", UNASSIGNED, True)]
    )
    n = len(rows)
    x = np.linspace(5.0, 195.0, n)  # left half: x < 100 px
    y = np.full(n, 50.0)
    return build_catalogue(
        np.column_stack([x, y]),
        [ID[r[0]] for r in rows],
        "defects",
        0.5,
        site=[r[1] for r in rows],
        probability=np.linspace(0.5, 1.0, n),
        variance=np.full(n, 0.01),
        detected=[r[2] for r in rows],
    )


def test_concentrations_by_hand():
    cat = hand_built()
    s = summarize(cat, "defects", (100, 200), 0.5)
    assert s["area_nm2"] == pytest.approx(50.0)  # 100·200 px · 0.25 Å² = 5000 Å²
    assert s["area_source"] == "image"
    assert s["n_sites"] == {"metal": 10, "chalcogen": 20, "unassigned": 1}
    assert s["n_columns"] == 27 and s["n_empty_sites"] == 4
    v1 = s["classes"]["vac_X1"]
    assert v1["count"] == 3
    assert v1["per_nm2"] == pytest.approx(3 / 50)
    assert v1["per_cm2"] == pytest.approx(3 / 50 * 1e14)  # 6e12 cm^-2
    assert v1["per_cm2_err"] == pytest.approx(np.sqrt(3) / 50 * 1e14)
    assert v1["eligible_site"] == "chalcogen" and v1["per_site"] == pytest.approx(3 / 20)
    vm = s["classes"]["vac_M"]
    assert vm["eligible_site"] == "metal" and vm["per_site"] == pytest.approx(2 / 10)
    assert s["classes"]["metal"]["count"] == 9  # the unassigned column counts as its class
    assert s["classes"]["dopant_M"]["count"] == 0 and s["classes"]["dopant_M"]["per_site"] == 0
    assert "background" not in s["classes"]
    assert s["defects"]["count"] == 3 + 2 + 2
    assert s["defects"]["per_cm2"] == pytest.approx(7 / 50 * 1e14)
    s2 = summarize(cat, "defects", (100, 200), 0.5, lattice_constant_A=3.16)
    assert s2["lattice_area_nm2"] == pytest.approx(10 * 3.16**2 * np.sqrt(3) / 2 / 100)


def test_mask_limits_area_and_counts():
    cat = hand_built()
    mask = np.zeros((100, 200), dtype=bool)
    mask[:, :100] = True
    s = summarize(cat, "defects", (100, 200), 0.5, mask=mask)
    assert s["area_nm2"] == pytest.approx(25.0) and s["area_source"] == "mask"
    inside = cat.x_px < 99.5
    assert s["n_columns"] + s["n_empty_sites"] == inside.sum()
    assert s["classes"]["metal"]["count"] == 8 and s["classes"]["vac_M"]["count"] == 2
    with pytest.raises(ValueError, match="mask"):
        summarize(cat, "defects", (100, 200), 0.5, mask=mask[:, :50])


def test_catalogue_validation():
    with pytest.raises(ValueError, match="class_id"):
        build_catalogue([[0, 0]], [len(NAMES)], "defects", 0.2, site=[METAL])
    with pytest.raises(ValueError, match="site"):
        build_catalogue([[0, 0]], [1], "defects", 0.2, site=[3])
    with pytest.raises(ValueError, match="pixel_size_A"):
        build_catalogue([[0, 0]], [1], "defects", 0.0, site=[METAL])
    with pytest.raises(ValueError, match="scheme"):
        summarize(hand_built(), "atoms", (100, 200), 0.5)


def test_files_round_trip(tmp_path):
    cat = hand_built()
    path = write_columns_csv(cat, tmp_path / "columns.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMN_FIELDS
    assert rows[0]["site"] == "metal" and rows[-1]["site"] == "unassigned"
    assert float(rows[3]["x_A"]) == pytest.approx(cat.x_px[3] * 0.5, abs=1e-3)
    back = read_columns_csv(path, scheme="defects")
    np.testing.assert_allclose(back.x_px, cat.x_px, atol=1e-3)
    np.testing.assert_array_equal(back.class_id, cat.class_id)
    np.testing.assert_array_equal(back.site, cat.site)
    np.testing.assert_array_equal(back.detected, cat.detected)
    assert back.pixel_size_A == pytest.approx(0.5, rel=1e-4)
    inferred = read_columns_csv(path)  # class names rebuilt from the file
    assert inferred.class_names[ID["vac_X2"]] == "vac_X2"

    summary = summarize(cat, "defects", (100, 200), 0.5)
    summary["classes"]["sub_X1"]["per_site"] = float("nan")  # NaN becomes null
    data = json.loads(write_summary_json(summary, tmp_path / "summary.json").read_text())
    assert data["classes"]["vac_X1"]["count"] == 3
    assert data["classes"]["sub_X1"]["per_site"] is None

    other = summarize(cat.select(cat.x_px < 100), "defects", (100, 200), 0.5)
    run = write_run_summary_csv(
        [flatten_summary(summary, image="a.dm4"), flatten_summary(other, image="b.dm4")],
        tmp_path / "run.csv",
    )
    with open(run, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["image"] for r in table] == ["a.dm4", "b.dm4"]
    assert float(table[0]["per_cm2_vac_X1"]) == pytest.approx(6e12)
    assert int(table[1]["count_vac_X1"]) == 0
    nested = write_run_summary_csv([summary], tmp_path / "nested.csv")  # flattened itself
    assert "count_vac_M" in nested.read_text().splitlines()[0]


def test_defect_and_vacancy_classes():
    assert defect_class_names("defects") == (
        "vac_X1", "vac_X2", "vac_M", "sub_X1", "sub_X2", "antisite_X1", "antisite_X2",
        "dopant_M",
    )  # fmt: skip
    comp = defect_class_names("composition")
    assert set(comp) == {"S", "Se", "Te", "vac_M", "vac_X", "other"}
    assert defect_class_names("atoms") == ()
    assert NAMES[vacancy_class("defects", METAL)] == "vac_M"
    assert NAMES[vacancy_class("defects", CHALCOGEN)] == "vac_X2"
    assert get_scheme("composition").names[vacancy_class("composition", CHALCOGEN)] == "vac_X"
    assert vacancy_class("atoms", METAL) == 0


def test_catalogue_from_lattice_counts_planted_vacancies():
    img, t, xy, inside = detected_columns("WSe2", {"vac_X2": 5, "vac_M": 3, "vac_X1": 7})
    occ = inside & (t.n_atoms > 0)
    # a network that is right on 90 % of columns, and puts the rest on a wrong-site class
    rng = np.random.default_rng(5)
    truth = t.class_id[occ]
    probs = np.full((occ.sum(), len(NAMES)), 0.02)
    probs[np.arange(len(truth)), truth] = 0.8
    wrong = rng.random(len(truth)) < 0.1
    other_site = np.where(t.site[occ] == METAL, ID["chalcogen"], ID["metal"])
    probs[wrong, other_site[wrong]] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    fit = fit_lattice(xy[occ], probs=probs, scheme="defects", image_shape=img.shape)
    cat = catalogue_from_lattice(fit, xy[occ], probs, "defects", 0.2, variance=probs * 0.01)
    assert np.all(cat.class_id[cat.detected] == truth)  # every wrong-site call corrected
    s = summarize(cat, "defects", img.shape, 0.2)
    in_image = occ | ((t.n_atoms == 0) & inside)
    b = fit.bond_length_px
    interior = np.all((xy > b) & (xy < 400 - 1 - b), axis=1)
    for kind in ("vac_X2", "vac_M"):
        assert s["classes"][kind]["count"] == np.sum((t.defect == kind) & in_image & interior)
    assert s["classes"]["vac_X1"]["count"] == np.sum((t.defect == "vac_X1") & occ)
    assert np.all(np.isnan(cat.probability[~cat.detected]))
    assert np.all(cat.probability[cat.detected] > 0.5)
    chosen = probs[np.arange(len(truth)), truth]
    np.testing.assert_allclose(cat.variance[cat.detected], 0.01 * chosen)


def test_empty_catalogue(tmp_path):
    cat = build_catalogue(np.zeros((0, 2)), [], "defects", 0.2, site=[])
    s = summarize(cat, "defects", (64, 64), 0.2)
    assert s["n_columns"] == 0
    assert np.isnan(s["classes"]["vac_X1"]["per_site"])  # no eligible site
    back = read_columns_csv(write_columns_csv(cat, tmp_path / "c.csv"), scheme="defects")
    assert len(back) == 0
