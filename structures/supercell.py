"""Monolayer supercells covering a field of view, at any in-plane rotation.

The builder generates lattice sites analytically over the window enlarged by a margin,
rotated by the requested angle, and keeps the sites (whole columns) that fall inside.
Pure: returns :class:`Monolayer`, never touches files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from structures.lattices import Composition, lattice_parameters, make_composition

METAL, CHALCOGEN = 0, 1
SITE_NAMES = ("metal", "chalcogen")


def symbol_numbers(symbols) -> np.ndarray:
    """Atomic numbers of a sequence of element symbols (one look-up per distinct symbol;
    ASE's own conversion checks every string)."""
    arr = np.asarray(symbols, dtype=object).astype(str)
    if arr.size == 0:
        return np.zeros(0, dtype=int)
    distinct, index = np.unique(arr, return_inverse=True)
    return np.array([atomic_numbers[e] for e in distinct], dtype=int)[index.ravel()]


def atom_symbols(atoms: Atoms) -> np.ndarray:
    """Element symbols of ``atoms`` as an object array (vectorised
    ``get_chemical_symbols``)."""
    return np.asarray(chemical_symbols, dtype=object)[atoms.numbers]


@dataclass(frozen=True)
class SiteTable:
    """Lattice sites (projected columns) of a monolayer, including emptied ones.

    Attributes
    ----------
    x, y : ndarray of float
        Nominal site positions in the cell frame [Å].
    sublattice : ndarray of int8
        0 metal, 1 chalcogen.
    defect : ndarray of str
        Defect kind of the site (``"none"`` when pristine); see ``structures.defects``.
    complex_id : ndarray of int
        Index of the vacancy complex the site belongs to, -1 when none.
    """

    x: np.ndarray
    y: np.ndarray
    sublattice: np.ndarray
    defect: np.ndarray
    complex_id: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def with_defects(self, defect: np.ndarray, complex_id: np.ndarray) -> SiteTable:
        return SiteTable(self.x, self.y, self.sublattice, defect, complex_id)


@dataclass(frozen=True)
class Monolayer:
    """A monolayer cell plus its site table and the field of view to image.

    Attributes
    ----------
    atoms : ase.Atoms
        Orthogonal cell ``[Lx + 2m, Ly + 2m, Lz]`` with vacuum along z.
        ``atoms.arrays["column"]`` holds, for each atom, the index of its site.
    sites : SiteTable
        One entry per projected column, emptied sites included.
    fov_origin : tuple of float
        Lower-left corner ``(x0, y0)`` of the field of view in the cell frame [Å].
    fov_extent : tuple of float
        Field of view ``(Lx, Ly)`` [Å].
    composition : Composition
        Host composition (alloy fractions).
    lattice_constant : float
        In-plane lattice constant a [Å].
    chalcogen_height : float
        Vertical chalcogen-chalcogen distance d_XX [Å].
    rotation_deg : float
        In-plane rotation of the lattice [degrees].
    """

    atoms: Atoms
    sites: SiteTable
    fov_origin: tuple[float, float]
    fov_extent: tuple[float, float]
    composition: Composition
    lattice_constant: float
    chalcogen_height: float
    rotation_deg: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def in_fov(self) -> np.ndarray:
        """Boolean mask of the sites inside the field of view."""
        x0, y0 = self.fov_origin
        lx, ly = self.fov_extent
        s = self.sites
        return (s.x >= x0) & (s.x < x0 + lx) & (s.y >= y0) & (s.y < y0 + ly)

    @property
    def z_metal(self) -> float:
        """Height of the metal plane [Å]."""
        return float(self.atoms.cell[2, 2]) / 2.0


def _hex_sites(a: float, extent: tuple[float, float], rotation_deg: float):
    """2H MX2 projected sites covering ``[0, Lx) x [0, Ly)`` for a rotated lattice.

    Returns x, y, sublattice. The lattice is anchored with a metal site at the centre of
    the window so that rotation happens about the centre.
    """
    lx, ly = extent
    theta = math.radians(rotation_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    a1 = rot @ np.array([a, 0.0])
    a2 = rot @ np.array([a / 2.0, a * math.sqrt(3) / 2.0])
    # chalcogen site at (a1 + a2) / 3 from a metal site: projected M-X distance a/sqrt(3)
    basis = [(np.zeros(2), METAL), ((a1 + a2) / 3.0, CHALCOGEN)]
    centre = np.array([lx / 2.0, ly / 2.0])
    radius = math.hypot(lx, ly) / 2.0 + 2 * a
    n = int(math.ceil(radius / (a * math.sqrt(3) / 2.0))) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    lattice = i.ravel()[:, None] * a1 + j.ravel()[:, None] * a2 + centre
    xs, ys, subs = [], [], []
    for offset, sub in basis:
        p = lattice + offset
        keep = (p[:, 0] >= 0) & (p[:, 0] < lx) & (p[:, 1] >= 0) & (p[:, 1] < ly)
        xs.append(p[keep, 0])
        ys.append(p[keep, 1])
        subs.append(np.full(keep.sum(), sub, dtype=np.int8))
    x, y, sub = np.concatenate(xs), np.concatenate(ys), np.concatenate(subs)
    order = np.lexsort((x, y))  # stable, row-major order of sites
    return x[order], y[order], sub[order]


def _assign_elements(fractions: Mapping[str, float], n: int, rng: np.random.Generator):
    """Exactly round(f * n) atoms of each element (largest remainders), shuffled."""
    elements = list(fractions)
    raw = np.array([fractions[e] * n for e in elements])
    counts = np.floor(raw).astype(int)
    remainder = n - counts.sum()
    if remainder > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:remainder]] += 1
    symbols = np.repeat(np.array(elements, dtype=object), counts)
    return symbols[rng.permutation(n)]


def build_monolayer(
    material: str | None = "MoS2",
    *,
    fov: tuple[float, float] | float = (20.0, 20.0),
    metals: Mapping[str, float] | None = None,
    chalcogens: Mapping[str, float] | None = None,
    rotation_deg: float = 0.0,
    margin: float = 4.0,
    vacuum: float = 5.0,
    displacement_sigma: float = 0.0,
    lattice_constant: float | None = None,
    chalcogen_height: float | None = None,
    rng: np.random.Generator | int | None = None,
) -> Monolayer:
    """Build a pristine (or alloyed) 2H MX2 monolayer covering a field of view.

    Parameters
    ----------
    material : str, optional
        ``"MoS2"``, ``"WSe2"``, ... ; sublattice fractions override it for alloys.
    fov : (float, float) or float
        Field of view ``(Lx, Ly)`` to image [Å]. Must hold at least one unit cell.
    metals, chalcogens : mapping, optional
        Alloy fractions, e.g. ``metals={"Mo": 0.5, "W": 0.5}``; lattice constant and
        chalcogen height then follow Vegard's law.
    rotation_deg : float
        In-plane rotation of the lattice [degrees], about the centre of the window.
    margin : float
        Real structure kept around the field of view [Å] so that image edges see a
        continuous film, not a cut. The cell is ``[Lx + 2 margin, Ly + 2 margin]``.
    vacuum : float
        Vacuum above and below the layer [Å].
    displacement_sigma : float
        Standard deviation of static random displacements of every atom [Å] (x, y, z).
    lattice_constant, chalcogen_height : float, optional
        Override the tabulated/Vegard values [Å].
    rng : Generator or int, optional
        Random source for alloy occupancies and displacements.

    Returns
    -------
    Monolayer
    """
    rng = np.random.default_rng(rng)
    composition: Composition = make_composition(material, metals, chalcogens)
    a, d_xx = lattice_parameters(composition)
    if lattice_constant is not None:
        if lattice_constant <= 0:
            raise ValueError(f"lattice_constant must be > 0 Å, got {lattice_constant}")
        a = float(lattice_constant)
    if chalcogen_height is not None:
        if chalcogen_height <= 0:
            raise ValueError(f"chalcogen_height must be > 0 Å, got {chalcogen_height}")
        d_xx = float(chalcogen_height)
    if np.isscalar(fov):
        fov = (float(fov), float(fov))
    fov = tuple(float(v) for v in fov)
    if len(fov) != 2:
        raise ValueError(f"fov must be (Lx, Ly) in Å, got {fov}")
    if min(fov) < a * math.sqrt(3):
        raise ValueError(
            f"fov {fov} Å is smaller than one rectangular unit cell ({a:.2f} x {a * 3**0.5:.2f} Å)"
        )
    if margin < 0:
        raise ValueError(f"margin must be >= 0 Å, got {margin}")
    if vacuum <= 0:
        raise ValueError(f"vacuum must be > 0 Å, got {vacuum}")
    if displacement_sigma < 0:
        raise ValueError(f"displacement_sigma must be >= 0 Å, got {displacement_sigma}")

    extent = (fov[0] + 2 * margin, fov[1] + 2 * margin)
    x, y, sub = _hex_sites(a, extent, rotation_deg)
    n_sites = len(x)
    metal_sites = np.flatnonzero(sub == METAL)
    chalc_sites = np.flatnonzero(sub == CHALCOGEN)

    lz = d_xx + 2 * vacuum
    z_m = lz / 2.0
    metal_symbols = _assign_elements(composition.metal_fractions, len(metal_sites), rng)
    chalc_symbols = _assign_elements(composition.chalcogen_fractions, 2 * len(chalc_sites), rng)

    # metal atoms, then chalcogen bottom/top pairs (two atoms per chalcogen column)
    columns = np.concatenate([metal_sites, np.repeat(chalc_sites, 2)])
    zs = np.concatenate(
        [
            np.full(len(metal_sites), z_m),
            np.tile([z_m - d_xx / 2, z_m + d_xx / 2], len(chalc_sites)),
        ]
    )
    symbols = list(metal_symbols) + list(chalc_symbols)
    positions = np.column_stack([x[columns], y[columns], zs])
    if displacement_sigma > 0:
        positions = positions + rng.normal(0.0, displacement_sigma, positions.shape)
    order = np.argsort(columns, kind="stable")
    atoms = Atoms(
        numbers=symbol_numbers(symbols)[order],
        positions=positions[order],
        cell=[extent[0], extent[1], lz],
        pbc=False,
    )
    atoms.arrays["column"] = columns[order].astype(np.int64)
    sites = SiteTable(
        x=x,
        y=y,
        sublattice=sub,
        defect=np.full(n_sites, "none", dtype=object),
        complex_id=np.full(n_sites, -1, dtype=np.int64),
    )
    return Monolayer(
        atoms=atoms,
        sites=sites,
        fov_origin=(margin, margin),
        fov_extent=fov,
        composition=composition,
        lattice_constant=a,
        chalcogen_height=d_xx,
        rotation_deg=float(rotation_deg),
        info={"displacement_sigma": float(displacement_sigma)},
    )
