"""Point defects of 2H MX2 monolayers, placed on whole columns.

Each defect kind acts on one projected column (a vacancy complex on a metal column and
its adjacent chalcogen columns). No two defects share a column. Defects are placed only on
sites inside the field of view; the margin stays pristine. Pure: Monolayer in, Monolayer
out.

Kinds (the names are used in configs, column tables and label schemes):

============== ============ ============================================================
kind           site         what happens to the column
============== ============ ============================================================
vac_X1         chalcogen    one of the two chalcogen atoms removed (top or bottom)
vac_X2         chalcogen    both chalcogen atoms removed: empty site
vac_M          metal        metal atom removed: empty site
sub_X1         chalcogen    one chalcogen atom replaced by ``substituent`` (e.g. SeTe)
sub_X2         chalcogen    both replaced by ``substituent`` (e.g. 2Te)
antisite_X1    metal        metal atom replaced by one chalcogen atom (e.g. Se_W)
antisite_X2    metal        metal atom replaced by two chalcogen atoms (e.g. 2Te_W)
dopant_M       metal        metal atom replaced by ``dopant`` (V, Nb, Re, Cr, ...)
vac_complex    metal        vac_M plus ``complex_size`` adjacent chalcogen vacancies
                            (each ``vac_X1`` or ``vac_X2`` per ``complex_vacancy``)
============== ============ ============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from scipy.spatial import cKDTree

from structures.lattices import CHALCOGENS
from structures.supercell import CHALCOGEN, METAL, Monolayer, atom_symbols, symbol_numbers

DEFECT_KINDS = (
    "vac_X1",
    "vac_X2",
    "vac_M",
    "sub_X1",
    "sub_X2",
    "antisite_X1",
    "antisite_X2",
    "dopant_M",
    "vac_complex",
)
DEFECT_SITE = {
    "vac_X1": CHALCOGEN,
    "vac_X2": CHALCOGEN,
    "sub_X1": CHALCOGEN,
    "sub_X2": CHALCOGEN,
    "vac_M": METAL,
    "antisite_X1": METAL,
    "antisite_X2": METAL,
    "dopant_M": METAL,
    "vac_complex": METAL,
}
# placement order: most constrained first
_ORDER = ("vac_complex",) + tuple(k for k in DEFECT_KINDS if k != "vac_complex")
_NEXT_CHALCOGEN = {"S": "Se", "Se": "Te", "Te": "Se"}


def _validate(defects: Mapping[str, float], by: str, ml: Monolayer):
    if by not in ("concentration", "exact", "count"):
        raise ValueError(f"by: expected 'concentration', 'exact' or 'count', got {by!r}")
    totals = {METAL: 0.0, CHALCOGEN: 0.0}
    for kind, value in defects.items():
        if kind not in DEFECT_KINDS:
            raise ValueError(
                f"defects: unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"defects.{kind}: expected a number, got {value!r}")
        if by == "count":
            if value < 0 or float(value) != int(value):
                raise ValueError(
                    f"defects.{kind}: a count must be a whole number >= 0, got {value}"
                )
        elif not 0.0 <= value <= 1.0:
            raise ValueError(f"defects.{kind}: concentration must be in [0, 1], got {value}")
        if by != "count":
            totals[DEFECT_SITE[kind]] += float(value)
    for sub, total in totals.items():
        if total > 1.0 + 1e-9:
            name = "metal" if sub == METAL else "chalcogen"
            raise ValueError(
                f"defects: concentrations on {name} sites sum to {total:g} > 1 per eligible site"
            )


def _neighbour_chalcogens(ml: Monolayer, metal_site: int, tree: cKDTree, chalc_idx: np.ndarray):
    """Indices of the chalcogen sites bonded to a metal site (3 in the bulk of the film)."""
    a = ml.lattice_constant
    p = (ml.sites.x[metal_site], ml.sites.y[metal_site])
    near = tree.query_ball_point(p, r=a / math.sqrt(3) * 1.1)
    return chalc_idx[np.asarray(near, dtype=int)]


# Kept as one function (~88 lines of code): validation, the placement order and the
# per-kind edits of the site table share its state; the per-kind edits are short branches.
def apply_defects(
    ml: Monolayer,
    defects: Mapping[str, float],
    *,
    by: str = "concentration",
    substituent: str | None = None,
    dopant: str = "Re",
    antisite_element: str | None = None,
    complex_size: int = 1,
    complex_vacancy: str = "vac_X1",
    rng: np.random.Generator | int | None = None,
) -> Monolayer:
    """Place point defects on a monolayer, one defect per column at most.

    Parameters
    ----------
    ml : Monolayer
        Structure from :func:`structures.build_monolayer` (may already hold defects;
        new ones go only on pristine columns).
    defects : mapping
        Defect kind -> concentration per eligible site in the field of view (``by`` =
        ``"concentration"``: the number is Binomial(n_eligible, c); ``"exact"``: round(c *
        n_eligible)) or exact number (``by="count"``).
    substituent : str, optional
        Chalcogen for ``sub_X1/sub_X2`` (default: the next chalcogen, S→Se, Se→Te, Te→Se).
    dopant : str
        Element for ``dopant_M`` (any element symbol).
    antisite_element : str, optional
        Chalcogen on the metal site for ``antisite_X1/X2`` (default: the host chalcogen).
    complex_size : int
        Adjacent chalcogen columns vacated in a ``vac_complex`` (1 to 3).
    complex_vacancy : {"vac_X1", "vac_X2"}
        What happens to each of those chalcogen columns.
    rng : Generator or int, optional

    Returns
    -------
    Monolayer
        A new monolayer; ``sites.defect`` records each column's kind.

    Raises
    ------
    ValueError
        Unknown kind or element, concentration outside [0, 1], concentrations on one
        sublattice summing above 1, or more defects than free eligible sites.
    """
    rng = np.random.default_rng(rng)
    _validate(defects, by, ml)
    host_x = ml.composition.host_chalcogen
    if substituent is None:
        substituent = _NEXT_CHALCOGEN[host_x]
    if substituent not in CHALCOGENS:
        raise ValueError(f"substituent: expected a chalcogen {CHALCOGENS}, got {substituent!r}")
    if antisite_element is None:
        antisite_element = host_x
    if antisite_element not in CHALCOGENS:
        raise ValueError(
            f"antisite_element: expected a chalcogen {CHALCOGENS}, got {antisite_element!r}"
        )
    if dopant not in atomic_numbers:
        raise ValueError(f"dopant: unknown element {dopant!r}")
    if not 1 <= int(complex_size) <= 3:
        raise ValueError(
            f"complex_size: expected 1 to 3 adjacent chalcogen sites, got {complex_size}"
        )
    if complex_vacancy not in ("vac_X1", "vac_X2"):
        raise ValueError(f"complex_vacancy: expected 'vac_X1' or 'vac_X2', got {complex_vacancy!r}")

    sites = ml.sites
    defect = sites.defect.copy()
    complex_id = sites.complex_id.copy()
    in_fov = ml.in_fov
    next_complex = int(complex_id.max()) + 1 if len(complex_id) else 0
    chalc_idx = np.flatnonzero(sites.sublattice == CHALCOGEN)
    tree = cKDTree(np.column_stack([sites.x[chalc_idx], sites.y[chalc_idx]]))

    for kind in _ORDER:
        if kind not in defects:
            continue
        value = defects[kind]
        sub = DEFECT_SITE[kind]
        eligible_all = np.flatnonzero((sites.sublattice == sub) & in_fov)
        if by == "count":
            n = int(value)
        elif by == "exact":
            n = int(round(float(value) * len(eligible_all)))
        else:
            n = int(rng.binomial(len(eligible_all), float(value)))
        if n == 0:
            continue
        free = np.flatnonzero((sites.sublattice == sub) & in_fov & (defect == "none"))
        if kind != "vac_complex":
            if n > len(free):
                raise ValueError(
                    f"defects.{kind}: asked for {n} but only {len(free)} free eligible sites "
                    "remain in the field of view"
                )
            chosen = rng.choice(free, size=n, replace=False)
            defect[chosen] = kind
            continue
        placed = 0
        for site in rng.permutation(free):
            if placed == n:
                break
            neigh = _neighbour_chalcogens(ml, site, tree, chalc_idx)
            neigh = neigh[(defect[neigh] == "none") & in_fov[neigh]]
            if len(neigh) < complex_size:
                continue
            members = rng.choice(neigh, size=complex_size, replace=False)
            defect[site] = "vac_M"
            defect[members] = complex_vacancy
            complex_id[site] = next_complex
            complex_id[members] = next_complex
            next_complex += 1
            placed += 1
        if placed < n:
            raise ValueError(
                f"defects.vac_complex: placed only {placed} of {n} complexes; too few free sites"
            )

    atoms = _rebuild_atoms(
        ml, defect, substituent=substituent, dopant=dopant, antisite=antisite_element, rng=rng
    )
    return Monolayer(
        atoms=atoms,
        sites=sites.with_defects(defect, complex_id),
        fov_origin=ml.fov_origin,
        fov_extent=ml.fov_extent,
        composition=ml.composition,
        lattice_constant=ml.lattice_constant,
        chalcogen_height=ml.chalcogen_height,
        rotation_deg=ml.rotation_deg,
        info={**ml.info, "substituent": substituent, "dopant": dopant},
    )


def _rebuild_atoms(ml, defect, *, substituent, dopant, antisite, rng) -> Atoms:
    """Apply the per-site defect kinds that are new relative to ``ml`` to its atoms."""
    atoms = ml.atoms
    old = ml.sites.defect
    column = atoms.arrays["column"]
    symbols = atom_symbols(atoms)
    positions = atoms.positions.copy()
    keep = np.ones(len(atoms), dtype=bool)
    extra_symbols, extra_pos, extra_col = [], [], []
    z_m, d = ml.z_metal, ml.chalcogen_height
    changed = np.flatnonzero(defect != old)
    # atoms of each changed column (atoms are sorted by column)
    starts = np.searchsorted(column, changed, side="left")
    ends = np.searchsorted(column, changed, side="right")
    for site, s, e in zip(changed, starts, ends, strict=True):
        kind = defect[site]
        members = np.arange(s, e)
        if kind in ("vac_X2", "vac_M"):
            keep[members] = False
        elif kind == "vac_X1":
            keep[members[rng.integers(len(members))]] = False
        elif kind == "sub_X1":
            symbols[members[rng.integers(len(members))]] = substituent
        elif kind == "sub_X2":
            symbols[members] = substituent
        elif kind == "dopant_M":
            symbols[members] = dopant
        elif kind in ("antisite_X1", "antisite_X2"):
            symbols[members] = antisite
            if kind == "antisite_X2":
                # two chalcogen atoms stacked in the metal column, at the chalcogen heights
                positions[members, 2] = z_m - d / 2
                for m in members:
                    extra_symbols.append(antisite)
                    extra_pos.append([positions[m, 0], positions[m, 1], z_m + d / 2])
                    extra_col.append(site)
    new_symbols = list(symbols[keep]) + extra_symbols
    new_positions = np.concatenate([positions[keep], np.reshape(extra_pos, (-1, 3))])
    new_column = np.concatenate([column[keep], np.asarray(extra_col, dtype=np.int64)])
    order = np.argsort(new_column, kind="stable")
    out = Atoms(
        numbers=symbol_numbers(new_symbols)[order],
        positions=new_positions[order],
        cell=atoms.cell,
        pbc=atoms.pbc,
    )
    out.arrays["column"] = new_column[order]
    return out
