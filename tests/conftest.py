"""Shared fixtures. Append new fixtures; keep the existing ones (several test files use them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

# -- simulation engine (simgen.optics / simulate / calibrate) -------------------------------------
#: Lattice constant and chalcogen-chalcogen height [Å] of the test materials.
TMD_LATTICE = {("Mo", "S"): (3.16, 3.17), ("W", "Se"): (3.282, 3.36), ("Mo", "Se"): (3.289, 3.34)}


def make_tmd_cell(
    metal: str,
    chalcogen: str,
    *,
    repeats: tuple[int, int] = (4, 2),
    vac_x1: tuple[int, ...] = (),
    vac_x2: tuple[int, ...] = (),
    vac_m: tuple[int, ...] = (),
    vacuum_A: float = 0.5,
):
    """Tiny periodic orthogonal 2H MX2 cell with chosen vacancies, and its columns.

    Sites are numbered in construction order (two metal and two chalcogen sites per
    ``a x sqrt(3) a`` cell); ``vac_x1`` removes the exit-side (upper z) chalcogen of
    those chalcogen sites, ``vac_x2`` both, ``vac_m`` the metal. Columns sit away from the
    cell edges (offset a/4, b/12), so no column wraps.

    Returns
    -------
    atoms : ase.Atoms
    columns : simgen.simulation.Columns
        Every site, emptied ones included (elements ``(metal, chalcogen)``).
    kinds : ndarray of str
        ``"M"``, ``"X2"``, ``"X1"``, ``"empty_X"``, ``"empty_M"`` per column.
    """
    from ase import Atoms

    from simgen.simulation import Columns

    a, dz = TMD_LATTICE[(metal, chalcogen)]
    b = math.sqrt(3.0) * a
    lz = dz + 2 * vacuum_A
    zc = lz / 2
    nx, ny = repeats
    off = np.array([0.25 * a, b / 12.0])
    m_sites, x_sites = [], []
    for i in range(nx):
        for j in range(ny):
            o = np.array([i * a, j * b]) + off
            m_sites += [o, o + (0.5 * a, 0.5 * b)]
            x_sites += [o + (0.5 * a, b / 6.0), o + (0.0, 2.0 * b / 3.0)]
    symbols, positions, xs, ys, counts, kinds = [], [], [], [], [], []
    for k, s in enumerate(m_sites):
        xs.append(s[0])
        ys.append(s[1])
        if k in vac_m:
            counts.append((0, 0))
            kinds.append("empty_M")
            continue
        symbols.append(metal)
        positions.append((s[0], s[1], zc))
        counts.append((1, 0))
        kinds.append("M")
    for k, s in enumerate(x_sites):
        xs.append(s[0])
        ys.append(s[1])
        if k in vac_x2:
            counts.append((0, 0))
            kinds.append("empty_X")
            continue
        zs = (zc - dz / 2,) if k in vac_x1 else (zc - dz / 2, zc + dz / 2)
        for z in zs:
            symbols.append(chalcogen)
            positions.append((s[0], s[1], z))
        counts.append((0, len(zs)))
        kinds.append("X1" if k in vac_x1 else "X2")
    atoms = Atoms(symbols=symbols, positions=positions, cell=[nx * a, ny * b, lz], pbc=True)
    columns = Columns(
        x=np.array(xs), y=np.array(ys), counts=np.array(counts), elements=(metal, chalcogen)
    )
    return atoms, columns, np.array(kinds)


@pytest.fixture(scope="session")
def tmd_cell():
    """The :func:`make_tmd_cell` builder."""
    return make_tmd_cell


#: Vacancies of the defect test cells (3 x 2 orthogonal cells: 12 metal, 12 chalcogen sites).
DEFECTS = {"vac_x1": (1, 6), "vac_x2": (4,), "vac_m": (9,)}

#: One microscope: a fixed 60-200 mrad HAADF detector and no contrast shift. The shipped
#: config draws both per sample (contrast-robust training data); tests that hand in one
#: calibration, or that fabricate an "experimental" image, pin them.
ONE_MICROSCOPE = {
    "optics.haadf_inner_mrad": 60.0,
    "optics.haadf_outer_mrad": 200.0,
    "optics.z_exponent_shift": 0.0,
}
MICROSCOPE_ARGS = [f"--set={k}={v}" for k, v in ONE_MICROSCOPE.items()]


@pytest.fixture(scope="session")
def calibration_for():
    """``get(elements)``: PRISM calibration at the default optics, as simgen gets it: the
    shipped one (``simgen/data/calibrations.json``) when there is one, else computed once
    per session (about 30 s per (metal, chalcogen) pair on two cores).
    """
    from simgen.calibrate import calibrate, calibration_key
    from simgen.calibration_table import shipped_calibration
    from simgen.incoherent import Calibration

    cache = {}

    def get(elements):
        key = tuple(elements)
        if key not in cache:
            data = shipped_calibration(calibration_key(None, key))
            cache[key] = Calibration.from_dict(data) if data else calibrate(None, key)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def prism_defect_cell():
    """``get(metal, chalcogen, **optics)``: a defect test cell and its PRISM image (cached).

    Returns ``(atoms, columns, kinds, Simulated)``; PRISM with interpolation 1 (exact) at
    0.2 Å pixels, periodic cell (~8 s per image on two cores).
    """
    from simgen.simulation import simulate

    cache = {}

    def get(metal, chalcogen, **optics):
        key = (metal, chalcogen, tuple(sorted(optics.items())))
        if key not in cache:
            atoms, columns, kinds = make_tmd_cell(metal, chalcogen, repeats=(3, 2), **DEFECTS)
            sim = simulate(
                atoms,
                columns,
                {"pixel_size_A": 0.2, **optics},
                model="prism",
                interpolation=1,
                periodic=True,
            )
            cache[key] = (atoms, columns, kinds, sim)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def toy_calibration():
    """A fixed Calibration for Mo, W, S, Se (values of a PRISM calibration; no simulation)."""
    from simgen.calibrate import Calibration

    return Calibration(
        elements=("S", "Se", "Mo", "W"),
        weights_A2={"S": 0.00464, "Se": 0.01731, "Mo": 0.02395, "W": 0.05335},
        kappa={"S": 1.13, "Se": 1.16, "Mo": 1.14, "W": 1.14},
        widths_A={"S": 0.082, "Se": 0.081, "Mo": 0.081, "W": 0.082},
        background=1.5e-4,
        energy_kV=80.0,
        semiangle_mrad=30.0,
        haadf_inner_mrad=60.0,
        haadf_outer_mrad=200.0,
        reference={"model": "toy"},
    )


def peak_values(image, rows, cols):
    """Image values at sub-pixel positions (cubic spline interpolation)."""
    from scipy.ndimage import map_coordinates

    from simgen.backend import to_numpy

    img = np.asarray(to_numpy(image), dtype=np.float64)
    return map_coordinates(img, [np.asarray(rows), np.asarray(cols)], order=3, mode="nearest")


def hollow_sites(metal: str, chalcogen: str, repeats=(3, 2)):
    """(x, y) [Å] of the hexagon centres (no column) of a :func:`make_tmd_cell` cell (the
    same geometry as the calibration's reference cells)."""
    from simgen.calibrate import hollow_sites as reference_hollow_sites

    return reference_hollow_sites(TMD_LATTICE[(metal, chalcogen)][0], repeats)


# -- training -------------------------------------------------------------------------------------
@pytest.fixture
def one_torch_thread():
    """Torch on one thread during a test (two threads on a busy two-core machine run
    several-fold slower); the previous count restored after it. Training test files use it
    for every test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
