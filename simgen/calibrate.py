"""Calibration of the incoherent HAADF model against PRISM or multislice.

The incoherent model (:mod:`simgen.incoherent`) writes the image as
``I(r) = b + sum_(j, e) |P|^2 * [A_je G_(sigma_e) + n_je sum_k t_ek G_(s_ek)](r - r_j)``
(sums over columns j, elements e and tails k)
with

* ``A_je = n_je * w_e * kappa_e ** (n_j - 1)``: ``n_je`` atoms of element ``e`` in a column
  of ``n_j`` atoms; ``w_e`` [Å²] is the HAADF cross-section of a lone atom of ``e`` (the
  fraction of the beam it scatters into the detector per unit probe intensity), and
  ``kappa_e`` the channelling factor of an atom sharing its column (a two-atom S2 column
  gives ``2 kappa_S w_S``, a mixed SSe column ``kappa_S w_S + kappa_Se w_Se``);
* ``sigma_e`` [Å]: the width of the object peak (thermal smearing and the extent of the
  high-angle scattering potential);
* ``t_ek`` [Å²], ``s_ek = sqrt(sigma_e^2 + tau_k^2)``: two broad tails per atom (k = 1, 2;
  two fitted extra widths ``tau_1 < tau_2`` shared by all elements), the signal a column
  sends into its surroundings;
* ``b``: a constant background (fraction of the beam).

:func:`calibrate` fixes these numbers for one energy, convergence angle and detector by
fitting the model to reference images (PRISM or multislice; zero aberrations, no source
or focal spread: those act on the probe, which the incoherent model computes exactly) of
small periodic cells, one per host lattice (the dataset's materials, or every
(metal, chalcogen) pair), each holding every column type: lone metal atoms and dopants,
pristine X2 columns, single-vacancy X columns (entrance- and exit-side atom), substituted
columns and empty sites, plus one cell per host lattice whose vacancies sit among pristine
columns (:func:`isolated_vacancy_cell`: the dark level of ordinary lattice). For fixed
widths the images are linear in ``(w_e, kappa_e w_e, t_ek, b)``: linear least squares on
relative residuals, nested in a bounded nonlinear least-squares fit of the widths and the
two tail widths (``scipy.optimize.least_squares``).

The result is a :class:`Calibration` (``to_dict``/``from_dict``; ``key`` names what it
depends on). Nothing here touches files: caching is the store/CLI layer's job.

API::

    key = calibration_key(optics, elements, reference_model="prism", interpolation=1, ...)
    cal = calibrate(optics, elements, reference_model="prism", interpolation=1,
                    frozen_phonons=0, potential_sampling_A=0.05, device="cpu", rng=0)
    assert cal.key == key
    data = cal.to_dict(); cal = Calibration.from_dict(data)
    cal = fit_calibration(images, columns, optics, pixel_size_A=p, cell_xy=...)  # any images
    atoms, columns, kinds = reference_cell("Mo", "S", others=("Se",))
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simgen.backend import to_numpy
from simgen.distributions import as_rng
from simgen.incoherent import (
    CALIBRATION_VERSION,
    MAX_WIDTH_A,
    NYQUIST_FRACTION,
    Calibration,
    IncoherentRenderer,
    atomic_number,
    canonical_elements,
    key_number,
    periodic_images,
)
from simgen.optics import OpticsConfig, ideal_optics, nyquist_sampling_A, optics_values
from simgen.simulation import Columns, simulate_series

__all__ = [
    "CALIBRATION_VERSION",
    "CHALCOGEN_SYMBOLS",
    "Calibration",
    "ReferenceSettings",
    "calibrate",
    "calibration_key",
    "fit_calibration",
    "hollow_sites",
    "isolated_vacancy_cell",
    "reference_cell",
    "reference_cells",
]

#: Elements that go on chalcogen sites of the reference cell; everything else is a metal.
CHALCOGEN_SYMBOLS = ("O", "S", "Se", "Te")

#: Starting peak width [Å] and focal-spread nodes of the fit (in every calibration's key).
FIT_INITIAL_WIDTH_A = 0.1
FIT_FOCAL_POINTS = 7

#: Residuals are divided by ``image + RESIDUAL_FLOOR * mean(image)`` (relative, softened).
RESIDUAL_FLOOR = 0.5

#: Starting values of the two shared tail widths [Å] and the bounds of each (after the
#: fit the narrower is ``tau_1``).
TAIL_WIDTH_START_A = (0.4, 1.0)
TAIL_WIDTH_BOUNDS_A = (0.15, 2.0)

#: Empty chalcogen sites of :func:`isolated_vacancy_cell` (the reference cell's one and
#: the others among pristine columns).
ISOLATED_EMPTY_SITES = 3


# -- reference cells -----------------------------------------------------------------------------
def _lattice(metal: str, chalcogen: str) -> tuple[float, float]:
    """Lattice constant and X–X height [Å] of 2H ``metal chalcogen``2.

    From ``structures.lattices.LATTICE_TABLE``; a pair it lacks (a dopant metal) takes the
    mean over the table's entries with the same chalcogen (or 3.2 Å, 3.3 Å).
    """
    try:
        from structures.lattices import LATTICE_TABLE
    except ImportError:  # pragma: no cover - structures is part of the project
        LATTICE_TABLE = {}
    if (metal, chalcogen) in LATTICE_TABLE:
        a, d = LATTICE_TABLE[(metal, chalcogen)]
        return float(a), float(d)
    same = [v for (m, x), v in LATTICE_TABLE.items() if x == chalcogen]
    if not same:
        return 3.2, 3.3
    return float(np.mean([v[0] for v in same])), float(np.mean([v[1] for v in same]))


def _split(elements: Sequence[str]) -> tuple[list[str], list[str]]:
    els = canonical_elements(elements)
    chalcogens = [e for e in els if e in CHALCOGEN_SYMBOLS]
    metals = [e for e in els if e not in CHALCOGEN_SYMBOLS]
    if not metals or not chalcogens:
        raise ValueError(
            f"elements: need at least one metal and one chalcogen {CHALCOGEN_SYMBOLS}, got "
            f"{list(els)}"
        )
    return metals, chalcogens


def reference_cell(
    metal: str,
    chalcogen: str,
    *,
    others: Sequence[str] = (),
    dopants: Sequence[str] = (),
    repeats: tuple[int, int] = (3, 2),
    lattice_A: float | None = None,
    height_A: float | None = None,
    vacuum_A: float = 0.5,
    rng=0,
):
    """Small periodic 2H ``metal chalcogen``2 cell holding every column type to calibrate.

    Metal sites hold ``metal`` (one left empty, two hold each metal of ``dopants``).
    Chalcogen sites hold pristine ``X2``
    columns except: three ``X`` columns keeping only the atom on the beam-entrance side
    (lower z; abTEM propagates along +z), three keeping only the exit-side atom (single
    vacancies), one empty site (double vacancy), and for each chalcogen ``Y`` in
    ``others`` the substituted columns ``XY``, ``YX`` (entrance side first) and ``Y2`` in
    the host's lattice. The site assignment is shuffled with ``rng``.

    Parameters
    ----------
    metal, chalcogen : str
        Host elements.
    others : sequence of str
        Further chalcogens that appear in mixed columns.
    dopants : sequence of str
        Further metals, each on two metal sites (in the host's lattice).
    repeats : (int, int)
        Orthogonal unit cells ``a x sqrt(3) a`` along x and y (grown if too few sites).
    lattice_A, height_A : float, optional
        Lattice constant and chalcogen–chalcogen height [Å]; default from
        ``structures.lattices.LATTICE_TABLE``.
    vacuum_A : float
        Vacuum below and above the layer [Å]; free propagation does not change the HAADF
        signal (0.5 and 1.25 Å give the same image to 1e-7), it only costs slices.
    rng : Generator, int or None
        Shuffles the site assignment.

    Returns
    -------
    atoms : ase.Atoms
        Orthogonal cell, vacuum along z.
    columns : Columns
        One row per site (empty sites included); ``elements`` by atomic number.
    kinds : ndarray of str
        Per column: ``M``, ``X2``, ``X_entry``, ``X_exit``, ``XY``, ``YX``, ``Y2``,
        ``empty_M``, ``empty_X`` with element symbols for M, X, Y.
    """
    from ase import Atoms

    others = [str(y) for y in others if str(y) != chalcogen]
    dopants = [str(d) for d in dopants if str(d) != metal]
    els = canonical_elements([metal, chalcogen, *others, *dopants])
    a, dz = _lattice(metal, chalcogen)
    a = float(lattice_A or a)
    dz = float(height_A or dz)
    if not (2.0 < a < 5.0 and 1.0 < dz < 5.0):
        raise ValueError(f"lattice_A/height_A: implausible values {a}, {dz}")
    x = chalcogen
    special = [(f"{x}_entry", (x,), (0,))] * 3 + [(f"{x}_exit", (x,), (1,))] * 3
    special += [("empty_X", (), ())]
    for y in others:  # substituents in the host lattice: both orders and a full column
        special += [
            (f"{x}{y}", (x, y), (0, 1)),
            (f"{y}{x}", (y, x), (0, 1)),
            (f"{y}2", (y, y), (0, 1)),
        ]
    nx, ny = (int(r) for r in repeats)
    if nx < 1 or ny < 1:
        raise ValueError(f"repeats: expected positive integers, got {repeats!r}")
    m_special = [("empty_M", ())] + [(d, (d,)) for d in dopants for _ in range(2)]
    while 2 * nx * ny < max(len(special), len(m_special)) + 4:
        nx += 1
    n_sites = 2 * nx * ny
    x_kinds = special + [(f"{x}2", (x, x), (0, 1))] * (n_sites - len(special))
    m_kinds = m_special + [(metal, (metal,))] * (n_sites - len(m_special))
    gen = as_rng(rng)
    x_kinds = [x_kinds[i] for i in gen.permutation(n_sites)]
    m_kinds = [m_kinds[i] for i in gen.permutation(n_sites)]

    b = math.sqrt(3.0) * a
    lz = dz + 2.0 * vacuum_A
    z_layer = (vacuum_A, vacuum_A + dz)  # entrance side, exit side
    offset = np.array([0.25 * a, b / 12.0])  # keeps every column off the cell edges
    symbols, positions, col_x, col_y, kinds, counts = [], [], [], [], [], []
    index = {e: k for k, e in enumerate(els)}
    k = 0
    for i in range(nx):
        for j in range(ny):
            o = np.array([i * a, j * b]) + offset
            for site_m, site_x in (
                (o, o + (0.5 * a, b / 6.0)),
                (o + (0.5 * a, 0.5 * b), o + (0.0, 2.0 * b / 3.0)),
            ):
                for site, (name, atoms_here, zs) in (
                    (site_m, (*m_kinds[k], (None,) * len(m_kinds[k][1]))),
                    (site_x, x_kinds[k]),
                ):
                    row = np.zeros(len(els), np.int64)
                    for s, z in zip(atoms_here, zs, strict=True):
                        symbols.append(s)
                        zz = 0.5 * lz if z is None else z_layer[z]
                        positions.append((site[0], site[1], zz))
                        row[index[s]] += 1
                    col_x.append(site[0])
                    col_y.append(site[1])
                    kinds.append(name)
                    counts.append(row)
                k += 1
    atoms = Atoms(symbols=symbols, positions=positions, cell=[nx * a, ny * b, lz], pbc=True)
    columns = Columns(
        x=np.asarray(col_x), y=np.asarray(col_y), counts=np.asarray(counts), elements=els
    )
    return atoms, columns, np.asarray(kinds)


def hollow_sites(lattice_A: float, repeats: tuple[int, int]) -> np.ndarray:
    """Hexagon centres (no column) [Å] of a :func:`reference_cell` of ``repeats`` cells
    with lattice constant ``lattice_A``: where an HAADF image is darkest; the reference
    level of the vacancy contrasts."""
    b = math.sqrt(3.0) * lattice_A
    pts = []
    for i in range(int(repeats[0])):
        for j in range(int(repeats[1])):
            o = np.array([i * lattice_A, j * b]) + (0.25 * lattice_A, b / 12.0)
            pts += [o + (0.0, b / 3.0), o + (0.5 * lattice_A, 5.0 * b / 6.0)]
    return np.array(pts)


def isolated_vacancy_cell(
    metal: str,
    chalcogen: str,
    *,
    n_empty: int = ISOLATED_EMPTY_SITES,
    repeats: tuple[int, int] = (4, 3),
    rng=0,
):
    """A host :func:`reference_cell` with double vacancies among pristine columns.

    The reference cell crowds its special sites (10 of 24 chalcogen sites in a 4 x 3
    cell), so its vacancies mostly border other defects; real vacancies mostly sit in
    ordinary lattice. This cell empties further chalcogen sites whose nearest neighbours
    (< 2.5 Å) are all host metal atoms or pristine X2 columns: fitting on it as well, the
    vacancy-site/hexagon-centre contrasts of ordinary lattice come out within 2 % of
    converged PRISM (``benchmarks/bench_convergence.py``; 4 % without it).

    Parameters
    ----------
    metal, chalcogen : str
        Host elements.
    n_empty : int
        Empty chalcogen sites in the cell, the reference cell's own one included (fewer if
        the cell has no more pristine places).
    repeats : (int, int)
        Orthogonal unit cells along x and y.
    rng : Generator or int
        Shuffles the reference cell's sites and picks the empty sites.

    Returns
    -------
    atoms, columns, kinds
        As :func:`reference_cell`; the new empty sites have kind ``empty_X``.
    """
    from ase import Atoms

    gen = as_rng(rng)  # an integer seeds the cell and the choice of sites alike
    seed = rng if isinstance(rng, int | np.integer) else gen
    atoms, cols, kinds = reference_cell(metal, chalcogen, repeats=repeats, rng=seed)
    kinds = kinds.astype(object)
    xy = np.stack([cols.x, cols.y], axis=1)
    box = np.asarray(atoms.cell.lengths()[:2])
    pristine = (metal, f"{chalcogen}2")
    for i in gen.permutation(np.nonzero(kinds == f"{chalcogen}2")[0]):
        if np.sum(kinds == "empty_X") >= int(n_empty):
            break
        near = np.hypot(*(((xy - xy[i] + box / 2) % box - box / 2).T)) < 2.5
        near[i] = False
        if all(k in pristine for k in kinds[near]):
            kinds[i] = "empty_X"
    counts = np.array(cols.counts)
    counts[kinds == "empty_X"] = 0
    keep = np.ones(len(atoms), bool)
    for i in np.nonzero(kinds == "empty_X")[0]:
        keep &= np.hypot(*(atoms.positions[:, :2] - xy[i]).T) > 0.1
    new = Atoms(
        symbols=np.array(atoms.get_chemical_symbols())[keep].tolist(),
        positions=atoms.positions[keep],
        cell=atoms.cell,
        pbc=True,
    )
    columns = Columns(x=cols.x, y=cols.y, counts=counts, elements=cols.elements)
    return new, columns, np.asarray(kinds, dtype=str)


def reference_cells(
    elements: Sequence[str],
    *,
    hosts: Sequence[tuple[str, str]] | None = None,
    repeats: tuple[int, int] = (3, 2),
    rng=0,
):
    """One :func:`reference_cell` and one :func:`isolated_vacancy_cell` per host lattice.

    Without ``hosts`` every (metal, chalcogen) pair of ``elements`` is a host (its own
    lattice, mixed columns with the other chalcogens). With ``hosts`` (the dataset's
    materials) only those lattices are built, each holding every other chalcogen as a
    substituent (XY, YX, Y2) and every metal that is not a host metal as a dopant: the
    columns a dataset contains, in the lattice where it contains them (measured: Te2 in
    WSe2 −3.65 % with every pair as a host, −0.64 % with WSe2 as the host). The
    calibration fits one set of per-element parameters to all cells.

    Returns
    -------
    list of (atoms, columns, kinds)
    """
    metals, chalcogens = _split(elements)
    gen = as_rng(rng)
    if hosts is None:
        pairs = [(m, x) for m in metals for x in chalcogens]
        cells = [
            reference_cell(m, x, others=chalcogens, repeats=repeats, rng=gen) for m, x in pairs
        ]
        return cells + [isolated_vacancy_cell(m, x, repeats=repeats, rng=gen) for m, x in pairs]
    pairs = [(str(m), str(x)) for m, x in hosts]
    bad = [p for p in pairs if p[0] not in metals or p[1] not in chalcogens]
    if not pairs or bad:
        raise ValueError(
            f"hosts: expected (metal, chalcogen) pairs of the elements {list(elements)}, "
            f"got {pairs}"
        )
    host_metals = {m for m, _ in pairs}
    dopants = [m for m in metals if m not in host_metals]
    cells = [
        reference_cell(m, x, others=chalcogens, dopants=dopants, repeats=repeats, rng=gen)
        for m, x in pairs
    ]
    return cells + [isolated_vacancy_cell(m, x, repeats=repeats, rng=gen) for m, x in pairs]


# -- fit -----------------------------------------------------------------------------------------
def _calibration_optics(optics) -> dict:
    """Nominal energy, aperture and detector; ideal probe otherwise."""
    return ideal_optics(optics)


def fit_calibration(
    images,
    columns,
    optics: Mapping[str, float] | OpticsConfig | None,
    *,
    pixel_size_A: float,
    origin_A: tuple[float, float] = (0.0, 0.0),
    cell_xy=None,
    periodic: bool = True,
    reference: Mapping[str, Any] | None = None,
    focal_points: int = FIT_FOCAL_POINTS,
    initial_width_A: float = FIT_INITIAL_WIDTH_A,
    tails: bool = True,
    shape: Calibration | None = None,
) -> Calibration:
    """Fit the incoherent model's weights, channelling factors and widths to images.

    Parameters
    ----------
    images : array [H, W] or sequence of arrays
        Reference image(s) (fraction of the beam), pixel ``(r, c)`` at
        ``origin_A + (c, r) * pixel_size_A``.
    columns : column table or sequence of them
        Columns (``x, y, counts, elements``; positions in Å) of each imaged structure.
    optics : mapping or OpticsConfig
        The optics of the images (the probe is computed from all of them).
    pixel_size_A : float
        Pixel size of the images [Å].
    origin_A : (float, float)
        Position of pixel (0, 0) [Å] (same for all images).
    cell_xy : (float, float) or sequence of them, optional
        Cell lengths [Å] of each structure; required with ``periodic``.
    periodic : bool
        Add the periodic images of the columns.
    reference : mapping, optional
        Description of how the images were made (stored in the calibration and its key).
    focal_points : int
        Focal-spread quadrature nodes.
    initial_width_A : float
        Starting width of every element [Å].
    tails : bool
        Fit two broad tails per element (weights ``t_e1``, ``t_e2``; two shared extra
        widths); without tails empty sites and hexagon centres come out 6–14 % low against
        converged multislice, with one tail width vacancy-site/hollow contrasts up to 5 %
        off (``benchmarks/bench_convergence.py``).
    shape : Calibration, optional
        Keep its tails (weights and widths) and start from its widths: how
        :func:`calibrate` fits the other defoci (the tails are the weakest-determined
        part of the fit, and a broader defocused probe makes them weaker still; fitted
        freely at ±30 Å they moved empty-site/hollow ratios by 6–8 %).

    Returns
    -------
    Calibration
        ``fit`` holds ``correlation``, ``rms_relative`` (rms residual / mean image),
        ``max_relative`` (max |residual| / max image) and ``n_pixels``, over all images.
    """

    opt = optics.nominal() if isinstance(optics, OpticsConfig) else optics_values(optics)
    single = hasattr(columns, "counts")
    images = [images] if single else list(images)
    tables = [columns] if single else list(columns)
    cells = [cell_xy] if single else list(cell_xy or [None] * len(tables))
    if not (len(images) == len(tables) == len(cells)):
        raise ValueError("images, columns and cell_xy: give one per reference structure")
    all_els = canonical_elements([e for tab in tables for e in tab.elements])
    renderers, targets = [], []
    for img in images:
        target = np.asarray(to_numpy(img), dtype=np.float64)
        if target.ndim != 2:
            raise ValueError(f"images: expected 2D arrays, got shape {target.shape}")
        targets.append(target.ravel())
        renderers.append(
            IncoherentRenderer(
                opt, pixel_size_A, origin_A, target.shape, focal_points=focal_points, device="cpu"
            )
        )
    groups = _peak_groups(tables, cells, renderers, periodic)
    theta, resid, widths, tail_widths, nfev, labels = _fit_design(
        groups, renderers, targets, all_els, initial_width_A, tails, shape
    )
    t = np.concatenate(targets)
    present = sorted({g[1] for g in groups}, key=atomic_number)
    weights, kappa, wid = _element_parameters(theta, labels, present, widths)
    tail_weights = [
        {e: float(theta[len(labels) + k * len(present) + i]) for i, e in enumerate(present)}
        for k in range(len(tail_widths))
    ] + [None, None]
    fit = {
        "correlation": float(np.corrcoef(t, t + resid)[0, 1]),
        "rms_relative": float(np.sqrt(np.mean(resid**2)) / np.mean(t)),
        "max_relative": float(np.max(np.abs(resid)) / np.max(t)),
        "n_pixels": int(t.size),
        "n_images": len(targets),
        "pixel_size_A": float(pixel_size_A),
        "nfev": int(nfev),
    }
    return Calibration(
        elements=tuple(present),
        weights_A2=weights,
        kappa=kappa,
        widths_A=wid,
        background=float(theta[-1]),
        energy_kV=opt["energy_kV"],
        semiangle_mrad=opt["semiangle_mrad"],
        haadf_inner_mrad=opt["haadf_inner_mrad"],
        haadf_outer_mrad=opt["haadf_outer_mrad"],
        reference=dict(reference or {"model": "image"}),
        fit=fit,
        tails_A2=tail_weights[0],
        tail_width_A=tail_widths[0] if tails else 0.0,
        tails2_A2=tail_weights[1],
        tail2_width_A=tail_widths[1] if tails else 0.0,
    )


def _peak_groups(tables, cells, renderers, periodic: bool) -> list:
    """Peaks to fit: ``(image index, element, class, x, y, atoms)`` with class 1 for lone
    atoms and 2 for atoms sharing a column (they get the channelling factor)."""
    groups = []
    for n, (tab, cell, r) in enumerate(zip(tables, cells, renderers, strict=True)):
        counts = np.asarray(tab.counts)
        x = np.asarray(tab.x, dtype=np.float64)
        y = np.asarray(tab.y, dtype=np.float64)
        n_atoms = counts.sum(axis=1)
        for i, e in enumerate(tab.elements):
            for cls, sel in ((1, n_atoms == 1), (2, n_atoms >= 2)):
                rows = np.nonzero(sel & (counts[:, i] > 0))[0]
                if rows.size == 0:
                    continue
                px, py, amp = x[rows], y[rows], counts[rows, i].astype(np.float64)
                if periodic:
                    if cell is None:
                        raise ValueError("cell_xy: needed with periodic=True")
                    ny, nx = r.grid_shape
                    lo = r.grid_origin_A
                    hi = (lo[0] + nx * r.step_A, lo[1] + ny * r.step_A)
                    sel_i, px, py = periodic_images(px, py, tuple(cell), lo, hi)
                    amp = amp[sel_i]
                groups.append((n, str(e), cls, px, py, amp))
    if not groups:
        raise ValueError("columns: no atoms to calibrate against")
    return groups


def _fit_design(groups, renderers, targets, all_els, initial_width_A, tails=True, shape=None):
    """Widths (and the two tail widths) by bounded nonlinear least squares; for given
    widths the image is linear in one weight per (element, class), two tail weights per
    element and the background (solved exactly). With ``shape`` (a Calibration) its tails
    are kept (weights and widths) and its widths are the starting point.

    Returns ``theta`` (linear terms: labels, then tail 1 and tail 2 per element of
    ``present``, then the background), the residual, the widths, the two tail widths
    (narrower first), ``nfev`` and the labels."""
    from scipy.optimize import least_squares

    widx = {e: k for k, e in enumerate(all_els)}
    labels = sorted({(g[1], g[2]) for g in groups}, key=lambda k: (atomic_number(k[0]), k[1]))
    lab_idx = {k: j for j, k in enumerate(labels)}
    present = sorted({g[1] for g in groups}, key=atomic_number)
    n_tails = len(TAIL_WIDTH_START_A) if tails else 0
    tail_idx = {
        (e, k): len(labels) + k * len(present) + i for k in range(n_tails)
        for i, e in enumerate(present)
    }  # fmt: skip
    n_cols = len(labels) + n_tails * len(present) + 1
    offsets = np.cumsum([0] + [t.size for t in targets])
    t = np.concatenate(targets)
    # relative residuals, softened: dark pixels (empty sites, hexagon centres) count as
    # much as bright ones, so their ratios to the columns come out right too
    weight = 1.0 / (np.abs(t) + RESIDUAL_FLOOR * np.mean(np.abs(t)))
    weight /= np.mean(weight)

    def design(params):
        widths, tail_widths = params[: len(all_els)], params[len(all_els) :]
        a = np.zeros((t.size, n_cols))
        for n, e, cls, px, py, amp in groups:
            sig = np.full(px.size, widths[widx[e]])
            rows = slice(offsets[n], offsets[n + 1])
            img = np.asarray(renderers[n].render(px, py, amp, sig), dtype=np.float64)
            a[rows, lab_idx[(e, cls)]] += img.ravel()
            for k in range(n_tails):
                img = renderers[n].render(px, py, 0.0 * amp, sig, [(amp, tail_widths[k])])
                a[rows, tail_idx[(e, k)]] += np.asarray(img, dtype=np.float64).ravel()
        a[:, -1] = 1.0
        return a

    fixed = np.zeros(n_cols)
    free = np.ones(n_cols, bool)
    shape_terms = (
        ((shape.tails_A2, shape.tail_width_A), (shape.tails2_A2, shape.tail2_width_A))
        if shape is not None
        else ()
    )
    if shape is not None and tails:  # the tails stay as ``shape`` has them
        for (e, k), j in tail_idx.items():
            fixed[j] = shape_terms[k][0].get(e, 0.0)
        free[len(labels) : n_cols - 1] = False

    def full(widths):
        if shape is not None and tails:
            return np.append(widths, [w for _, w in shape_terms[:n_tails]])
        return widths

    def solve(params):
        a = design(full(params))
        rest = t - a @ fixed
        aw = a[:, free] * weight[:, None]
        scale = np.linalg.norm(aw, axis=0)
        scale[scale == 0] = 1.0  # a tail of width 0 (a shape without a second tail)
        sol, *_ = np.linalg.lstsq(aw / scale, rest * weight, rcond=None)
        theta = fixed.copy()
        theta[free] = sol / scale
        return theta, a @ theta - t

    x0 = np.full(len(all_els), initial_width_A)
    lo, hi = np.zeros(len(all_els)), np.full(len(all_els), MAX_WIDTH_A)
    if shape is not None:
        x0 = np.array([shape.widths_A.get(e, initial_width_A) for e in all_els])
    elif tails:
        x0 = np.append(x0, TAIL_WIDTH_START_A)
        lo = np.append(lo, [TAIL_WIDTH_BOUNDS_A[0]] * n_tails)
        hi = np.append(hi, [TAIL_WIDTH_BOUNDS_A[1]] * n_tails)
    res = least_squares(
        lambda w: solve(w)[1] * weight, x0=x0, bounds=(lo, hi), x_scale=0.05, diff_step=1e-3
    )
    theta, resid = solve(res.x)
    widths = {e: float(res.x[widx[e]]) for e in all_els}
    tail_widths = [float(w) for w in full(res.x)[len(all_els) :]]
    if n_tails == 2 and tail_widths[0] > tail_widths[1]:  # the narrower tail first
        tail_widths.reverse()
        first, second = (
            [tail_idx[(e, k)] for e in present] for k in range(2)
        )  # fmt: skip
        theta[first + second] = theta[second + first]
    return theta, resid, widths, tail_widths, res.nfev, labels


def _element_parameters(theta, labels, present, widths):
    """Per-element weight, channelling factor and width from the fitted linear terms."""
    lin = {k: float(theta[j]) for j, k in enumerate(labels)}
    kappas = {e: lin[(e, 2)] / lin[(e, 1)] for e in present if (e, 1) in lin and (e, 2) in lin}
    kappa_default = float(np.mean(list(kappas.values()))) if kappas else 1.0
    weights, kappa, wid = {}, {}, {}
    for e in present:
        k = kappas.get(e, kappa_default)
        w = lin[(e, 1)] if (e, 1) in lin else lin[(e, 2)] / k
        weights[e], kappa[e], wid[e] = float(w), float(k), widths[e]
    bad = [e for e in weights if not (weights[e] > 0 and kappa[e] > 0)]
    if bad:
        raise RuntimeError(
            f"calibration fit gave a non-positive weight or channelling factor for {bad}: "
            f"weights {weights}, kappa {kappa}; the reference images are unsuitable"
        )
    return weights, kappa, wid


@dataclass(frozen=True)
class ReferenceSettings:
    """How the reference images of a calibration are made (every field enters the key).

    Parameters
    ----------
    reference_model : {"prism", "multislice"}
        Reference simulation.
    interpolation : int
        PRISM interpolation factor of the reference (1 = exact, the default: the
        reference cells are small).
    frozen_phonons : int
        Frozen-phonon configurations of the reference (0 = static lattice).
    phonon_sigma_A : float
        Their displacement standard deviation per direction [Å].
    potential_sampling_A, slice_thickness_A : float
        Wave grid step and slice thickness [Å] of the reference.
    transmission_supersampling : int
        Potential supersampling of the reference
        (:func:`simgen.transmission.band_limited_transmission`; 4 = converged to 0.2 %).
    repeats : (int, int)
        Size of each reference cell in orthogonal unit cells. (4, 3) (24 chalcogen sites,
        10 of them special): in a (3, 2) cell most hexagon centres border a vacancy, and
        the dark level of the fit came out 25 % low on ordinary lattice (MoS2, 60 kV).
    pixel_size_A : float, optional
        Scan step of the reference images [Å]; default ``0.9 * Nyquist`` (the images are
        band-limited, so this holds all their information at the lowest cost).
    rng : int
        Seed of the site shuffling and of the frozen-phonon displacements (an integer: it
        is part of the key).
    hosts : tuple of (metal, chalcogen), optional
        The host lattices (:func:`reference_cells`); default every pair of the elements.
        ``simgen`` passes the dataset's materials.
    defocus_A : tuple of float
        Defoci ``C10`` [Å] at which the model is fitted (0 must be one of them); with more
        than one the model interpolates its parameters between them
        (:meth:`Calibration.at_defocus`; the other defoci keep the focus fit's tails).
        Default: focus only. Measured (``benchmarks/bench_convergence.py``): fits at
        -30…30 Å did not lower the model's errors at ±30 Å defocus (MoS2 empty-site
        ratios got worse, 2 → 5–7 %); the largest defocus error is the depth asymmetry
        of single vacancies (entrance-side atom +6/−8 %, exit-side −2/+1 % at ∓30 Å),
        which a model that knows column occupancies, not heights, cannot represent.
    """

    reference_model: str = "prism"
    interpolation: int = 1
    frozen_phonons: int = 0
    phonon_sigma_A: float = 0.07
    potential_sampling_A: float = 0.05
    transmission_supersampling: int = 4
    slice_thickness_A: float = 1.0
    repeats: tuple[int, int] = (4, 3)
    pixel_size_A: float | None = None
    rng: int = 0
    defocus_A: tuple[float, ...] = (0.0,)
    hosts: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self):
        if self.hosts is not None:
            hosts = tuple(sorted({(str(m), str(x)) for m, x in self.hosts}))
            object.__setattr__(self, "hosts", hosts)
        defoci = tuple(sorted({float(c) for c in self.defocus_A}))
        if 0.0 not in defoci or any(abs(c) > 500 for c in defoci):
            raise ValueError(
                f"defocus_A: expected defoci within ±500 Å including 0, got {self.defocus_A!r}"
            )
        object.__setattr__(self, "defocus_A", defoci)
        if self.reference_model not in ("prism", "multislice"):
            raise ValueError(
                f"reference_model: expected 'prism' or 'multislice', got {self.reference_model!r}"
            )
        rng = self.rng
        if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
            raise ValueError(
                f"rng: calibrate takes an integer seed (it enters the key), got {rng!r}"
            )


def _prepare(optics, elements, settings: ReferenceSettings):
    """Calibration optics, elements, reference cells, scan step and the description stored
    in the calibration (what its key hashes)."""
    opt = _calibration_optics(optics)
    els = canonical_elements(elements)
    s = settings
    metals, chalcogens = _split(els)
    hosts = s.hosts
    if hosts is not None and set(hosts) == {(m, x) for m in metals for x in chalcogens}:
        hosts = None  # every pair is a host: the same cells as the default (and key)
    cells = reference_cells(els, hosts=hosts, repeats=s.repeats, rng=int(s.rng))
    p = float(s.pixel_size_A or NYQUIST_FRACTION * nyquist_sampling_A(opt))
    reference = {
        "model": s.reference_model,
        "interpolation": int(s.interpolation) if s.reference_model == "prism" else 1,
        "frozen_phonons": int(s.frozen_phonons),
        "phonon_sigma_A": key_number(s.phonon_sigma_A) if s.frozen_phonons else 0.0,
        "potential_sampling_A": key_number(s.potential_sampling_A),
        "transmission_supersampling": int(s.transmission_supersampling),
        "slice_thickness_A": key_number(s.slice_thickness_A),
        "cells": [
            {
                "formula": atoms.get_chemical_formula(),
                "lengths_A": [key_number(v) for v in atoms.cell.lengths()],
            }
            for atoms, _, _ in cells
        ],
        "repeats": [int(r) for r in s.repeats],
        "seed": int(s.rng),
        "pixel_size_A": key_number(p),
        "defocus_A": [key_number(c) for c in s.defocus_A],
        # the fit's own settings: a change of any of them changes every calibration
        "fit": {
            "tails": len(TAIL_WIDTH_START_A),
            "isolated_empty_sites": ISOLATED_EMPTY_SITES,
            "residual_floor": key_number(RESIDUAL_FLOOR),
            "tail_width_start_A": [key_number(w) for w in TAIL_WIDTH_START_A],
            "tail_width_bounds_A": [key_number(b) for b in TAIL_WIDTH_BOUNDS_A],
            "initial_width_A": key_number(FIT_INITIAL_WIDTH_A),
            "focal_points": FIT_FOCAL_POINTS,
        },
    }
    if hosts is not None:
        reference["hosts"] = [list(h) for h in hosts]
    return opt, els, cells, p, reference


def calibration_key(
    optics: Mapping[str, float] | OpticsConfig | None,
    elements: Sequence[str],
    settings: ReferenceSettings | None = None,
    **overrides,
) -> str:
    """The :attr:`Calibration.key` that :func:`calibrate` with these arguments returns.

    Cheap (no simulation): lets a cache be looked up before calibrating. ``overrides``
    are fields of :class:`ReferenceSettings`.
    """
    opt, els, _, _, reference = _prepare(optics, elements, _settings(settings, overrides))
    probe = Calibration(
        elements=els,
        weights_A2=dict.fromkeys(els, 1.0),
        kappa=dict.fromkeys(els, 1.0),
        widths_A=dict.fromkeys(els, 0.1),
        background=0.0,
        energy_kV=opt["energy_kV"],
        semiangle_mrad=opt["semiangle_mrad"],
        haadf_inner_mrad=opt["haadf_inner_mrad"],
        haadf_outer_mrad=opt["haadf_outer_mrad"],
        reference=reference,
    )
    return probe.key


def _settings(settings: ReferenceSettings | None, overrides: dict) -> ReferenceSettings:
    settings = ReferenceSettings() if settings is None else settings
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ReferenceSettings)})
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return dataclasses.replace(settings, **overrides) if overrides else settings


def calibrate(
    optics: Mapping[str, float] | OpticsConfig | None,
    elements: Sequence[str],
    settings: ReferenceSettings | None = None,
    *,
    device: str = "cpu",
    **overrides,
) -> Calibration:
    """Calibrate the incoherent model for one set of optics and elements.

    Simulates :func:`reference_cells` (one 4 x 3 cell per host lattice) with
    ``reference_model`` at the nominal energy, semi-angle and detector of ``optics`` with an
    ideal probe (no aberrations, source size or focal spread: they act on the probe, which
    the incoherent model computes exactly), then :func:`fit_calibration` on all of them.
    Its :attr:`~Calibration.key` equals :func:`calibration_key` of the same arguments. Cost:
    about 20-45 s per host lattice on two CPU cores with the defaults (converged PRISM).

    Parameters
    ----------
    optics : mapping, OpticsConfig or None
        Only ``energy_kV``, ``semiangle_mrad``, ``haadf_inner_mrad`` and
        ``haadf_outer_mrad`` matter (their nominal values for a config).
    elements : sequence of str
        Elements the incoherent model will meet: metals and chalcogens (O, S, Se, Te).
    settings : ReferenceSettings, optional
        How the reference images are made (default :class:`ReferenceSettings()`).
    device : {"cpu", "gpu", "auto"}
        Where the reference simulations run (the fit runs on the CPU).
    **overrides
        Fields of :class:`ReferenceSettings` to change, e.g. ``reference_model="multislice"``.

    Returns
    -------
    Calibration
        ``fit`` adds ``reference_seconds``, the reference simulations' wall time.
    """
    return calibrate_detectors(optics, elements, None, settings, device=device, **overrides)[0]


def calibrate_detectors(
    optics: Mapping[str, float] | OpticsConfig | None,
    elements: Sequence[str],
    detectors_mrad: Sequence[tuple[float, float]] | None,
    settings: ReferenceSettings | None = None,
    *,
    device: str = "cpu",
    **overrides,
) -> list[Calibration]:
    """:func:`calibrate` for several HAADF detectors from one set of reference simulations.

    The exit waves do not depend on the detector: each reference cell is simulated once
    and read by every detector (one radially binned detector), then the model is fitted
    per detector. Each result has the key of :func:`calibrate` with that detector in
    ``optics`` and its numbers to ≈ 1e-6 (:func:`calibrate` integrates one annular
    detector directly): a detector grid costs one reference simulation plus a fit of a
    few seconds per detector.

    Parameters
    ----------
    optics, elements, settings, device, **overrides
        As :func:`calibrate`.
    detectors_mrad : sequence of (float, float) or None
        ``(inner, outer)`` collection angles [mrad]; None = the detector of ``optics``.

    Returns
    -------
    list of Calibration
        One per detector, in order.
    """
    s = _settings(settings, overrides)
    opt, _, cells, p, reference = _prepare(optics, elements, s)
    opt["pixel_size_A"] = p
    if detectors_mrad is None:
        detectors = [(opt["haadf_inner_mrad"], opt["haadf_outer_mrad"])]
    else:
        detectors = [(float(a), float(b)) for a, b in detectors_mrad]
        if len(set(detectors)) != len(detectors):
            raise ValueError(f"detectors_mrad: a detector is listed twice: {detectors}")
        for a, b in detectors:
            optics_values({**opt, "haadf_inner_mrad": a, "haadf_outer_mrad": b})  # validates
    t0 = time.perf_counter()
    images = {(c, d): [] for c in s.defocus_A for d in detectors}
    for n, (atoms, columns, _) in enumerate(cells):
        series = simulate_series(
            atoms,
            columns,
            opt,
            C10_A=s.defocus_A,
            detectors_mrad=detectors,
            model=s.reference_model,
            interpolation=s.interpolation,
            frozen_phonons=s.frozen_phonons,
            phonon_sigma_A=s.phonon_sigma_A,
            potential_sampling_A=s.potential_sampling_A,
            transmission_supersampling=s.transmission_supersampling,
            slice_thickness_A=s.slice_thickness_A,
            periodic=True,
            device=device,
            rng=np.random.default_rng([int(s.rng), n]),
        )
        for ref in series:
            q = ref.params
            images[(q["C10_A"], (q["haadf_inner_mrad"], q["haadf_outer_mrad"]))].append(ref.image)
    seconds = time.perf_counter() - t0

    def fit_at(c, detector, shape=None):
        return fit_calibration(
            images[(c, detector)],
            [cell[1] for cell in cells],
            {**opt, "C10_A": c, "haadf_inner_mrad": detector[0], "haadf_outer_mrad": detector[1]},
            pixel_size_A=p,
            origin_A=(0.0, 0.0),
            cell_xy=[tuple(cell[0].cell.lengths()[:2]) for cell in cells],
            periodic=True,
            reference=reference,
            shape=shape,
        )

    out = []
    for detector in detectors:
        fits = {0.0: fit_at(0.0, detector)}
        fits |= {c: fit_at(c, detector, fits[0.0]) for c in s.defocus_A if c != 0.0}
        cal = fits[0.0]
        others = tuple(
            {"C10_A": c, **fit._parameters(), "correlation": fit.fit["correlation"]}
            for c, fit in fits.items()
            if c != 0.0
        )
        out.append(
            dataclasses.replace(
                cal,
                defocus_fits=others,
                fit={**cal.fit, "reference_seconds": round(seconds, 2)},
            )
        )
    return out
