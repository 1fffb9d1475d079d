"""The calibrations shipped with simgen: complete, current, used, and reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from simgen.calibrate import calibrate, calibration_key
from simgen.calibration_table import SHIPPED, shipped_entries
from simgen.incoherent import CALIBRATION_VERSION, Calibration


def test_every_shipped_entry_is_current_and_valid():
    """Each listed (optics, elements) has an entry under the key the current code computes
    (a change of the reference numerics without `make calibrations` fails here), and every
    entry is a valid calibration whose stored key matches its content."""
    entries = shipped_entries()
    for optics, elements, hosts in SHIPPED:
        key = calibration_key(optics, elements, hosts=hosts)
        assert key in entries, f"{key} not shipped: run `make calibrations`"
        cal = Calibration.from_dict(entries[key])
        assert cal.fit["correlation"] > 0.9995
        assert cal.version == CALIBRATION_VERSION
        assert 0 < cal.tail_width_A < cal.tail2_width_A and len(cal.tail_terms()) == 2


def test_the_default_dataset_needs_no_calibration_step(tmp_path, monkeypatch):
    """`make dataset` on a fresh machine: the default config's calibration comes from the
    shipped table; nothing is computed and the user's cache stays empty."""
    from simgen.api import cached_calibration
    from simgen.config import SimgenConfig
    from simgen.pipeline import calibration_request

    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    for overrides in (
        {},
        {"structure.material": "WSe2"},
        {"structure.material": "WSe2", "structure.dopant": "V"},
        {"structure.defects": {"vac_X1": 0.04, "dopant_M": 0.01}},  # Re, the default dopant
        {"optics.energy_kV": 60.0, "optics.semiangle_mrad": 25.0},
    ):
        cfg = SimgenConfig().with_overrides(overrides)
        key, _ = calibration_request(cfg)

        def compute(key=key):
            raise AssertionError(f"{key}: calibrated although shipped")

        data = cached_calibration(key, compute)
        assert Calibration.from_dict(data).key == key
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_shipped_entry_is_reproduced():
    """Recomputing one entry (MoS2, 80 kV, 30 mrad) gives the shipped numbers."""
    optics = {"energy_kV": 80.0, "semiangle_mrad": 30.0}
    optics |= {"haadf_inner_mrad": 60.0, "haadf_outer_mrad": 200.0}
    shipped = Calibration.from_dict(shipped_entries()[calibration_key(optics, ("Mo", "S"))])
    again = calibrate(optics, ("Mo", "S"))
    assert again.key == shipped.key
    # the weights to 0.2 %; the widths and tails, weakly determined, to 2 % (the least
    # squares runs on thread-parallel FFTs: the last digits vary between machines) ...
    for name, rel in (
        ("weights_A2", 2e-3),
        ("kappa", 2e-3),
        ("widths_A", 2e-2),
        ("tails_A2", 2e-2),
        ("tails2_A2", 2e-2),
    ):
        for e in ("Mo", "S"):
            assert getattr(again, name)[e] == pytest.approx(getattr(shipped, name)[e], rel=rel)
    assert again.tail_width_A == pytest.approx(shipped.tail_width_A, rel=2e-2)
    assert again.tail2_width_A == pytest.approx(shipped.tail2_width_A, rel=2e-2)
    # ... and the images they make agree to 1e-3 of the maximum
    from simgen.calibrate import reference_cell
    from simgen.simulation import simulate

    atoms, columns, _ = reference_cell("Mo", "S", repeats=(3, 2), rng=5)
    a, b = (
        simulate(
            atoms, columns, {**optics, "pixel_size_A": 0.2}, calibration=c, periodic=True
        ).image
        for c in (again, shipped)
    )
    assert abs(a - b).max() < 1e-3 * b.max()


def test_calibrate_cli_says_the_calibration_is_shipped(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simgen.cli import app

    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    one_detector = ["--set", "optics.haadf_inner_mrad=60", "--set", "optics.haadf_outer_mrad=200"]
    result = CliRunner().invoke(app, ["calibrate", *one_detector])
    assert result.exit_code == 0, result.output
    assert "shipped with simgen" in result.output
    assert "calibrating" not in result.output
    result = CliRunner().invoke(app, ["calibrate"])  # the default draws the detector
    assert result.exit_code == 0, result.output
    assert "detector grid of 15 calibrations; 15 of them shipped with simgen" in result.output
    assert "calibrating" not in result.output


ROBUST_DETECTOR = {
    "optics.haadf_inner_mrad": {"uniform": [40.0, 120.0]},
    "optics.haadf_outer_mrad": {"uniform": [150.0, 250.0]},
}


def test_every_shipped_grid_node_is_current():
    """Every node of the shipped detector grids is in the table under the key the current
    code computes, with frozen-phonon references."""
    from simgen.calibration_table import SHIPPED_GRIDS, grid_node_keys, shipped_keys

    entries = shipped_entries()
    assert set(shipped_keys()) == set(entries)
    for grid in SHIPPED_GRIDS:
        for key in grid_node_keys(*grid):
            assert key in entries, f"{key} not shipped: run `make calibrations`"
            cal = Calibration.from_dict(entries[key])
            assert cal.reference["frozen_phonons"] > 0
            # eight phonon configurations leave each column's own displacement noise in
            # the reference: r ≈ 0.996 (static references: 0.99999)
            assert cal.fit["correlation"] > 0.99


def test_a_drawn_detector_takes_a_shipped_grid(tmp_path, monkeypatch):
    """A config that draws its detector (the robust recipe's ranges) gets a detector grid
    assembled from shipped nodes: no reference simulation runs."""
    import simgen.calibrate
    from simgen.api import cached_calibration
    from simgen.config import SimgenConfig
    from simgen.incoherent import DetectorGrid
    from simgen.pipeline import calibration_request

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated although shipped")

    monkeypatch.setattr(simgen.calibrate, "calibrate_detectors", refuse)
    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    said = []
    for overrides in ({}, {"structure.material": "WSe2", "structure.dopant": "V"}):
        cfg = SimgenConfig().with_overrides({**overrides, **ROBUST_DETECTOR})
        key, compute = calibration_request(cfg)
        assert key.startswith("grid-prism-80kV-30mrad-40to120-150to250mrad-")
        grid = DetectorGrid.from_dict(cached_calibration(key, compute, announce=said.append))
        assert grid.inner_mrad == (40.0, 60.0, 80.0, 100.0, 120.0)
        assert grid.outer_mrad == (150.0, 200.0, 250.0)
    assert said == []


def test_unusable_detector_distributions_are_refused():
    from simgen.config import SimgenConfig
    from simgen.pipeline import calibration_request

    cfg = SimgenConfig().with_overrides({"optics.haadf_inner_mrad": {"normal": [60.0, 10.0]}})
    with pytest.raises(ValueError, match="optics.haadf_inner_mrad: .*bounded distribution"):
        calibration_request(cfg)
    # outer draws up to 260 mrad need a 300 mrad node, beyond the 0.05 Å wave grid (278)
    cfg = SimgenConfig().with_overrides({"optics.haadf_outer_mrad": {"uniform": [150, 260]}})
    with pytest.raises(ValueError, match="outer node at 300 mrad .*resolves scattering only"):
        calibration_request(cfg)


def test_calibrate_cli_lists_a_shipped_grid(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simgen.cli import app

    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    args = ["calibrate", "--set", "structure.material=WSe2"]
    args += ["--set", "optics.haadf_inner_mrad={uniform: [45, 110]}"]
    args += ["--set", "optics.haadf_outer_mrad=200"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "detector grid of 5 calibrations" in result.output  # 40..120 x 200 mrad
    assert "120-200: weights_A2" in result.output
    assert "calibrating" not in result.output


@pytest.mark.slow
def test_a_shipped_grid_node_is_reproduced():
    """Recomputing one node of the MoS2 grid alone (80 kV, 30 mrad, 80–200 mrad, 8
    frozen-phonon configurations) gives the shipped numbers, although the table computed
    it together with 14 other detectors."""
    from simgen.calibrate import calibrate_detectors
    from simgen.calibration_table import SHIPPED_GRIDS, grid_node_keys
    from simgen.config import GRID_FROZEN_PHONONS

    grid = next(g for g in SHIPPED_GRIDS if g[1] == ("Mo", "S"))
    optics, elements, hosts, detectors = grid
    key = grid_node_keys(*grid)[detectors.index((80.0, 200.0))]
    shipped = Calibration.from_dict(shipped_entries()[key])
    (again,) = calibrate_detectors(
        optics, elements, [(80.0, 200.0)], hosts=hosts, frozen_phonons=GRID_FROZEN_PHONONS
    )
    assert again.key == shipped.key
    # the images agree (what the model is for); the parameters less tightly than for a
    # static reference: with two tails and the frozen-phonon noise the peak weights trade
    # with the tails, and the fit's last digits vary with thread-parallel FFTs (measured:
    # the Mo weight 2-4 % apart between runs)
    from simgen.calibrate import reference_cell
    from simgen.simulation import simulate

    atoms, columns, _ = reference_cell("Mo", "S", repeats=(3, 2), rng=5)
    node = {**optics, "haadf_inner_mrad": 80.0, "haadf_outer_mrad": 200.0, "pixel_size_A": 0.2}
    a, b = (
        np.asarray(simulate(atoms, columns, node, calibration=c, periodic=True).image)
        for c in (again, shipped)
    )
    assert np.max(np.abs(a - b)) < 3e-3 * np.max(b)
    for name, rel in (("weights_A2", 0.08), ("kappa", 2e-2)):
        for e in elements:
            assert getattr(again, name)[e] == pytest.approx(getattr(shipped, name)[e], rel=rel)
