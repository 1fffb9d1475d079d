"""Pictures of a labelled image: overlay, class averages, defect density."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_lattice import detected_columns

from simgen.experiment.lattice import fit_lattice
from structures import CHALCOGEN, METAL, get_scheme
from training.experiments.catalogue import build_catalogue, catalogue_from_lattice
from training.experiments.pictures import (
    class_averages,
    class_averages_png,
    defect_density_map,
    defect_density_png,
    overlay_png,
)

NAMES = get_scheme("defects").names


@pytest.fixture(scope="module")
def labelled():
    """A rendered WSe2 image with vacancies and its catalogue (true classes as probabilities)."""
    img, t, xy, inside = detected_columns("WSe2", {"vac_X2": 6, "vac_M": 4, "vac_X1": 12}, size=300)
    occ = inside & (t.n_atoms > 0)
    probs = np.eye(len(NAMES))[t.class_id[occ]] * 0.9 + 0.1 / len(NAMES)
    fit = fit_lattice(xy[occ], probs=probs, scheme="defects", image_shape=img.shape)
    cat = catalogue_from_lattice(fit, xy[occ], probs, "defects", 0.2)
    return img, cat


def check_png(path, max_kb=400):
    assert path.exists() and path.stat().st_size < max_kb * 1024
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 100 < w < 1500 and 100 < h < 1500


def test_pictures_are_written(labelled, tmp_path):
    img, cat = labelled
    check_png(overlay_png(img, cat, "defects", tmp_path / "overlay.png", title="WSe2"))
    check_png(class_averages_png(img, cat, "defects", tmp_path / "averages.png"))
    check_png(defect_density_png(img, cat, "defects", tmp_path / "density.png"))
    empty = cat.select(np.zeros(len(cat), dtype=bool))
    check_png(class_averages_png(img, empty, "defects", tmp_path / "none.png", patch_px=21))
    check_png(overlay_png(img, empty, "defects", tmp_path / "none_overlay.png"))
    with pytest.raises(ValueError, match="image"):
        overlay_png(img[None], cat, "defects", tmp_path / "bad.png")


def test_class_averages_show_the_physics(labelled):
    img, cat = labelled
    avg = class_averages(img, cat, "defects", patch_px=15)
    centre = {name: m[7, 7] for name, (m, _) in avg.items()}
    assert {"metal", "chalcogen", "vac_X1", "vac_X2", "vac_M"} <= set(avg)
    # W (Z = 74) brighter than Se2, Se2 brighter than one Se, an empty site darkest
    assert centre["metal"] > centre["chalcogen"] > centre["vac_X1"] > centre["vac_X2"]
    assert centre["vac_M"] < 0.5 * centre["metal"]
    n_metal = np.sum(cat.class_id == NAMES.index("metal"))
    assert 0.8 * n_metal < avg["metal"][1] <= n_metal  # patches leaving the image skipped
    m = avg["metal"][0]
    assert np.unravel_index(np.argmax(m), m.shape) == (7, 7)  # centred on the column


def test_defect_density_map():
    rng = np.random.default_rng(1)
    h, w, p = 300, 400, 0.2  # 60 × 80 Å = 48 nm²
    n = 2000
    xy = rng.uniform([-0.5, -0.5], [w - 0.5, h - 0.5], (n, 2))
    cat = build_catalogue(
        xy, np.full(n, NAMES.index("vac_X1")), "defects", p, site=np.full(n, CHALCOGEN)
    )
    dens, sigma = defect_density_map(cat, (h, w), scheme="defects", sigma_A=8.0)
    assert sigma == 8.0 and dens.shape == (h, w)
    expected = n / (h * w * p * p / 100)  # per nm²
    assert dens.mean() == pytest.approx(expected, rel=0.05)
    # edge-corrected: the border is not diluted
    assert dens[:, :10].mean() == pytest.approx(expected, rel=0.2)
    # a cluster shows up where it is
    cluster = rng.normal([100.0, 200.0], 10.0, (300, 2))
    cat2 = build_catalogue(
        np.vstack([xy[:200], cluster]),
        np.full(500, NAMES.index("vac_M")),
        "defects",
        p,
        site=np.full(500, METAL),
    )
    dens2, _ = defect_density_map(cat2, (h, w), classes=["vac_M"], sigma_A=4.0)
    r, c = np.unravel_index(np.argmax(dens2), dens2.shape)
    assert abs(c - 100) < 15 and abs(r - 200) < 15
    none, _ = defect_density_map(cat2, (h, w), classes=["dopant_M"])
    assert not none.any()
