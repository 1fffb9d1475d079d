"""Projected columns and label schemes.

A column is every atom that shares one projected (x, y) site. :func:`column_table`
reads them off a builder :class:`~structures.supercell.Monolayer` (emptied sites
included); :func:`columns_from_atoms` derives them from any ``ase.Atoms`` (a relaxed cell
from DFT, a CIF, ...).

Label schemes (class ids are stable; 0 is always background):

``atoms``
    background, metal, chalcogen — by the site a column occupies; empty sites are
    background.
``defects`` (default)
    background, metal, chalcogen (full, host), then one class per defect kind:
    vac_X1, vac_X2, vac_M, sub_X1, sub_X2, antisite_X1, antisite_X2, dopant_M.
    Columns of a vacancy complex carry their own kinds (vac_M and vac_X1/vac_X2).
``composition``
    one class per site composition: Mo, W, then chalcogen pairs S2, SSe, STe, Se2, SeTe,
    Te2, single chalcogens S, Se, Te, then vac_M (empty metal site), vac_X (empty
    chalcogen site) and ``other`` (dopants, antisites).
custom
    ``{"name": ..., "by": "defect" | "composition", "classes": {class: [keys...]}}``:
    each listed defect kind / composition maps to the class; unlisted occupied columns
    fall back to ``metal`` / ``chalcogen`` when those classes exist, else ``background``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from structures.defects import DEFECT_KINDS
from structures.lattices import CHALCOGENS, METALS
from structures.supercell import CHALCOGEN, METAL, Monolayer

#: Defect kinds a column can carry (a vacancy complex labels its columns vac_M/vac_X*).
DEFECT_CLASSES = tuple(kind for kind in DEFECT_KINDS if kind != "vac_complex")


def composition_string(counts: Mapping[str, int]) -> str:
    """``{"S": 2}`` -> ``"S2"``, ``{"S": 1, "Se": 1}`` -> ``"SSe"``, ``{}`` -> ``""``.

    Elements are ordered by atomic number; a count of 1 is not written.
    """
    parts = []
    for el in sorted(counts, key=lambda e: atomic_numbers[e]):
        n = counts[el]
        if n > 0:
            parts.append(el if n == 1 else f"{el}{n}")
    return "".join(parts)


_ELEMENT = re.compile(r"([A-Z][a-z]?)(\d*)")

#: Class names that are never defects: the background and the host sites.
HOST_CLASSES = ("background", "metal", "chalcogen")


def parse_composition(text: str) -> dict[str, int] | None:
    """Inverse of :func:`composition_string`: ``"SSe"`` -> ``{"S": 1, "Se": 1}``,
    ``"S2"`` -> ``{"S": 2}``; ``None`` when ``text`` is not a composition of elements."""
    parts = _ELEMENT.findall(text)
    if not parts or "".join(e + n for e, n in parts) != text:
        return None
    if not all(e in atomic_numbers for e, _ in parts):
        return None
    out: dict[str, int] = {}
    for e, n in parts:
        out[e] = out.get(e, 0) + (int(n) if n else 1)
    return out


def defect_classes(class_names) -> list[str]:
    """Classes of a label scheme that count as defects (the one rule of the project).

    Every class but the background (id 0), ``metal``, ``chalcogen`` and full host columns
    of a composition scheme (one atom of a host metal, ``Mo``, ``W``; two chalcogen
    atoms, ``S2``, ``SSe``, ``Te2``...). So ``defects`` gives its 8 defect kinds,
    ``composition`` gives the single-atom chalcogen columns (``S``, ``Se``, ``Te``: one
    atom missing), ``vac_M``, ``vac_X`` and ``other``, a custom scheme gives its own
    classes (a dopant class named by its element, ``Re``, included), and ``atoms`` gives
    none.

    Parameters
    ----------
    class_names : sequence of str or LabelScheme
        Names by class id (index 0 is the background), or a scheme (its
        :attr:`LabelScheme.class_names`).

    Returns
    -------
    list of str
    """
    names = class_names.class_names if isinstance(class_names, LabelScheme) else class_names
    out = []
    for name in list(names)[1:]:
        if name in HOST_CLASSES or name.startswith("unused_"):
            continue
        comp = parse_composition(name)
        if comp is not None:
            n = sum(comp.values())
            if n == 1 and set(comp) <= set(METALS):
                continue
            if n == 2 and set(comp) <= set(CHALCOGENS):
                continue
        out.append(name)
    return out


@dataclass(frozen=True)
class LabelScheme:
    """Mapping from columns to class ids; also what a store or checkpoint says its classes are.

    Attributes
    ----------
    name : str
        Scheme name (``atoms``, ``defects``, ``composition`` or a custom name; empty when
        read from a store that does not record it).
    names : tuple of str
        Class names, one per id in ``ids``.
    by : {"site", "defect", "composition", ""}
        Which column property the mapping keys are (empty: unknown, e.g. a store written
        by another tool).
    mapping : dict
        Key (defect kind or composition string) -> class id.
    ids : tuple of int
        Class id of each name; default ``0, 1, ..., len(names) - 1`` (the schemes built
        here). A store may skip ids (``[0, 1, 3]``); 0 is always the background.
    """

    name: str
    names: tuple[str, ...]
    by: str
    mapping: dict = field(default_factory=dict)
    ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        ids = tuple(int(i) for i in self.ids) if self.ids else tuple(range(len(self.names)))
        object.__setattr__(self, "ids", ids)

    @property
    def n_classes(self) -> int:
        """Number of network outputs: ``max(id) + 1`` (class 0 = background always counted)."""
        return max(self.ids) + 1 if self.ids else 0

    @property
    def class_names(self) -> list[str]:
        """Name of every class id ``0 .. n_classes - 1``: 0 is ``background`` unless named,
        ids the scheme skips are ``unused_<id>``."""
        out = [f"unused_{i}" for i in range(self.n_classes)]
        if out:
            out[0] = "background"
        for i, name in zip(self.ids, self.names, strict=True):
            out[i] = name
        return out

    def class_of(self, name: str) -> int:
        return self.ids[self.names.index(name)]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "names": list(self.names),
            "ids": list(self.ids),
            "by": self.by,
            "mapping": dict(self.mapping),
        }

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "label_scheme") -> LabelScheme:
        """Inverse of :meth:`to_dict`; also reads a store's bare ``{"ids", "names"}``.

        Raises
        ------
        ValueError
            Malformed mapping: missing or unequal ``ids``/``names``, ids outside
            ``[0, 255]`` or repeated (the message starts with ``where``).
        """
        if not isinstance(data, Mapping) or "names" not in data:
            raise ValueError(f"{where}: expected a mapping with 'ids' and 'names', got {data!r}")
        names = list(data["names"])
        ids = list(data["ids"]) if "ids" in data else list(range(len(names)))
        if len(ids) != len(names) or not ids:
            raise ValueError(f"{where}: 'ids' and 'names' must be non-empty and of equal length")
        if not all(
            isinstance(i, int | np.integer) and not isinstance(i, bool) and 0 <= int(i) < 256
            for i in ids
        ):
            raise ValueError(f"{where}: ids must be integers in [0, 255], got {ids}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: duplicate class ids {ids}")
        return cls(
            str(data.get("name", "")),
            tuple(names),
            str(data.get("by", "")),
            dict(data.get("mapping", {})),
            ids=tuple(int(i) for i in ids),
        )

    def same_classes(self, other: LabelScheme) -> bool:
        """True when both schemes give the same names to the same ids (what a model and
        the stores it reads must agree on; name, ``by`` and mapping may differ)."""
        return (self.ids, self.names) == (other.ids, other.names)

    def assign(
        self, site: np.ndarray, n_atoms: np.ndarray, defect: np.ndarray, composition: np.ndarray
    ) -> np.ndarray:
        """Class id of each column from its site, atom count, defect kind and composition."""
        out = np.zeros(len(site), dtype=np.int16)
        if self.by == "site":
            out[(site == METAL) & (n_atoms > 0)] = self.class_of("metal")
            out[(site == CHALCOGEN) & (n_atoms > 0)] = self.class_of("chalcogen")
            return out
        keys = defect if self.by == "defect" else composition
        fallback = {
            METAL: self.class_of("metal") if "metal" in self.names else 0,
            CHALCOGEN: self.class_of("chalcogen") if "chalcogen" in self.names else 0,
        }
        other = self.class_of("other") if "other" in self.names else None
        # a lattice has a handful of distinct keys: look each up once
        distinct, inverse = np.unique(
            np.asarray(keys, dtype=object).astype(str), return_inverse=True
        )
        inverse = inverse.ravel()
        mapped = np.array([str(key) in self.mapping for key in distinct], dtype=bool)[inverse]
        ids = np.array([self.mapping.get(str(key), 0) for key in distinct], dtype=np.int16)
        empty = np.asarray(n_atoms) == 0
        if self.by == "composition" and other is not None:
            rest = np.full(len(site), other, dtype=np.int16)
        else:
            site = np.asarray(site)
            rest = np.where(site == METAL, fallback[METAL], 0).astype(np.int16)
            rest[site == CHALCOGEN] = fallback[CHALCOGEN]
        out[:] = np.where(mapped, ids[inverse], np.where(empty, 0, rest))
        return out


def _defects_scheme() -> LabelScheme:
    names = ("background", "metal", "chalcogen") + DEFECT_CLASSES
    mapping = {kind: names.index(kind) for kind in DEFECT_CLASSES}
    return LabelScheme("defects", names, "defect", mapping)


def _composition_scheme() -> LabelScheme:
    pairs = [
        composition_string({a: 1, b: 1} if a != b else {a: 2})
        for a, b in combinations_with_replacement(CHALCOGENS, 2)
    ]
    names = ("background",) + METALS + tuple(pairs) + CHALCOGENS + ("vac_M", "vac_X", "other")
    mapping = {n: i for i, n in enumerate(names) if n not in ("background", "other")}
    return LabelScheme("composition", names, "composition", mapping)


PRESETS = {
    "atoms": lambda: LabelScheme("atoms", ("background", "metal", "chalcogen"), "site"),
    "defects": _defects_scheme,
    "composition": _composition_scheme,
}


def get_scheme(scheme: str | Mapping | LabelScheme = "defects") -> LabelScheme:
    """Return a :class:`LabelScheme` from a preset name, a custom mapping or a scheme.

    Raises
    ------
    ValueError
        Unknown preset name or malformed custom mapping.
    """
    if isinstance(scheme, LabelScheme):
        return scheme
    if isinstance(scheme, str):
        if scheme not in PRESETS:
            raise ValueError(f"scheme: unknown label scheme {scheme!r}; presets: {tuple(PRESETS)}")
        return PRESETS[scheme]()
    if isinstance(scheme, Mapping):
        if "names" in scheme and "by" in scheme:  # a serialised scheme
            return LabelScheme.from_dict(scheme)
        unknown = set(scheme) - {"name", "by", "classes"}
        if unknown or "classes" not in scheme:
            raise ValueError(
                "scheme: a custom scheme is {name, by: defect|composition, classes: "
                f"{{class: [keys]}}}}, got keys {sorted(scheme)}"
            )
        by = scheme.get("by", "defect")
        if by not in ("defect", "composition"):
            raise ValueError(f"scheme.by: expected 'defect' or 'composition', got {by!r}")
        classes = scheme["classes"]
        if not isinstance(classes, Mapping) or not classes:
            raise ValueError("scheme.classes: expected a non-empty mapping class -> [keys]")
        names = ["background"]
        mapping = {}
        for cls_name, keys in classes.items():
            if cls_name == "background":
                raise ValueError("scheme.classes: 'background' is class 0 and takes no keys")
            names.append(str(cls_name))
            if isinstance(keys, str):
                keys = [keys]
            for key in keys or []:
                if key in mapping:
                    raise ValueError(f"scheme.classes: key {key!r} is mapped twice")
                if by == "defect" and key not in DEFECT_CLASSES + ("none",):
                    raise ValueError(
                        f"scheme.classes.{cls_name}: unknown defect kind {key!r}; "
                        f"expected one of {DEFECT_CLASSES + ('none',)}"
                    )
                mapping[key] = len(names) - 1
        return LabelScheme(str(scheme.get("name", "custom")), tuple(names), by, mapping)
    raise ValueError(f"scheme: expected a preset name or a mapping, got {scheme!r}")


@dataclass(frozen=True)
class ColumnTable:
    """Every projected column of a structure (one row per column).

    Attributes
    ----------
    x, y : ndarray of float
        Column positions in the cell frame [Å] (mean of the column's atoms; the nominal
        site for an emptied one).
    site : ndarray of int8
        0 metal, 1 chalcogen.
    n_atoms : ndarray of int
        Number of atoms in the column (0 for an emptied site).
    counts : ndarray of int, shape (n_columns, n_elements)
        Atoms of each element, in the order of ``elements``.
    elements : tuple of str
        Element symbols of ``counts``' columns, by atomic number.
    composition : ndarray of str
        E.g. ``"Mo"``, ``"S2"``, ``"SSe"``, ``""`` for empty.
    defect : ndarray of str
        Defect kind, ``"none"`` for a pristine column.
    class_id : ndarray of int16
        Class under ``scheme``.
    in_fov : ndarray of bool
        Column lies inside the structure's field of view.
    complex_id : ndarray of int
        Vacancy-complex index (-1 when none).
    scheme : LabelScheme
    """

    x: np.ndarray
    y: np.ndarray
    site: np.ndarray
    n_atoms: np.ndarray
    counts: np.ndarray
    elements: tuple[str, ...]
    composition: np.ndarray
    defect: np.ndarray
    class_id: np.ndarray
    in_fov: np.ndarray
    complex_id: np.ndarray
    scheme: LabelScheme

    def __len__(self) -> int:
        return len(self.x)

    def select(self, mask: np.ndarray) -> ColumnTable:
        """Rows where ``mask`` (bool array or indices) holds."""
        kw = {
            f: getattr(self, f)[mask]
            for f in (
                "x",
                "y",
                "site",
                "n_atoms",
                "counts",
                "composition",
                "defect",
                "class_id",
                "in_fov",
                "complex_id",
            )
        }
        return ColumnTable(elements=self.elements, scheme=self.scheme, **kw)

    def count_defects(self, only_fov: bool = True) -> dict[str, int]:
        """Number of columns of each defect kind (vacancy complexes counted once)."""
        sel = self.in_fov if only_fov else np.ones(len(self), bool)
        kinds, n = np.unique(self.defect[sel].astype(str), return_counts=True)
        out = {str(k): int(c) for k, c in zip(kinds, n, strict=True) if k != "none"}
        complexes = np.unique(self.complex_id[sel & (self.complex_id >= 0)])
        if len(complexes):
            out["vac_complex"] = len(complexes)
        return out

    def to_records(self) -> list[dict]:
        """One dict per column (for CSV/JSON export)."""
        return [
            {
                "x_A": float(self.x[k]),
                "y_A": float(self.y[k]),
                "site": "metal" if self.site[k] == METAL else "chalcogen",
                "n_atoms": int(self.n_atoms[k]),
                "composition": str(self.composition[k]),
                "defect": str(self.defect[k]),
                "class_id": int(self.class_id[k]),
                "class_name": self.scheme.class_names[int(self.class_id[k])],
                "in_fov": bool(self.in_fov[k]),
            }
            for k in range(len(self))
        ]


def _counts_matrix(numbers: np.ndarray, column: np.ndarray, n_columns: int):
    """Atoms of each element per column, and the elements (by atomic number) [counts]."""
    numbers = np.asarray(numbers, dtype=np.int64)
    present, element = np.unique(numbers, return_inverse=True)  # ascending Z
    elements = tuple(chemical_symbols[int(z)] for z in present)
    counts = np.zeros((n_columns, len(elements)), dtype=np.int64)
    if len(numbers):
        flat = np.asarray(column, dtype=np.int64) * len(elements) + element.ravel()
        counts += np.bincount(flat, minlength=counts.size).reshape(counts.shape)
    return counts, elements


def _compositions(counts: np.ndarray, elements: tuple[str, ...]) -> np.ndarray:
    out = np.empty(len(counts), dtype=object)
    if len(counts) == 0:
        return out
    # a lattice has a handful of distinct columns: format each once
    # rows of small counts as one integer each (a faster unique than along an axis)
    base = int(counts.max()) + 1
    if counts.shape[1] * math.log2(base) < 62:
        codes = counts @ (base ** np.arange(counts.shape[1], dtype=np.int64))
        _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
        rows = counts[first]
    else:  # too many elements or atoms per column for one integer
        rows, inverse = np.unique(counts, axis=0, return_inverse=True)
    names = np.empty(len(rows), dtype=object)
    for k, row in enumerate(rows):
        names[k] = composition_string({e: int(n) for e, n in zip(elements, row, strict=True)})
    out[:] = names[inverse.ravel()]
    return out


def _composition_keys(scheme, composition, counts, elements, n_atoms, site):
    """Keys for composition schemes: empty sites get ``vac_M``/``vac_X``; a metal site
    holding no metal (an antisite) is ``other``, never a chalcogen-column class."""
    keys = composition.copy()
    if scheme.by != "composition":
        return keys
    keys[(n_atoms == 0) & (site == METAL)] = "vac_M"
    keys[(n_atoms == 0) & (site == CHALCOGEN)] = "vac_X"
    metal_cols = np.array([e not in CHALCOGENS for e in elements], dtype=bool)
    has_metal = (
        counts[:, metal_cols].sum(axis=1) > 0 if metal_cols.any() else np.zeros(len(keys), bool)
    )
    keys[(site == METAL) & (n_atoms > 0) & ~has_metal] = "other"
    return keys


def column_table(ml: Monolayer, scheme: str | Mapping | LabelScheme = "defects") -> ColumnTable:
    """Column table of a builder monolayer, emptied sites included.

    Parameters
    ----------
    ml : Monolayer
    scheme : str or mapping or LabelScheme
        Label scheme (see module docstring).
    """
    scheme = get_scheme(scheme)
    atoms = ml.atoms
    n = len(ml.sites)
    column = atoms.arrays["column"]
    counts, elements = _counts_matrix(atoms.numbers, column, n)
    n_atoms = counts.sum(axis=1)
    x, y = ml.sites.x.copy(), ml.sites.y.copy()
    if len(atoms):
        occupied = n_atoms > 0
        sx = np.bincount(column, weights=atoms.positions[:, 0], minlength=n)
        sy = np.bincount(column, weights=atoms.positions[:, 1], minlength=n)
        x[occupied] = sx[occupied] / n_atoms[occupied]
        y[occupied] = sy[occupied] / n_atoms[occupied]
    composition = _compositions(counts, elements)
    defect = ml.sites.defect.astype(object)
    site = ml.sites.sublattice.astype(np.int8)
    return _labelled_table(
        scheme, x, y, site, n_atoms, counts, elements, composition, defect,
        ml.in_fov.copy(), ml.sites.complex_id.copy(),
    )  # fmt: skip


def _labelled_table(
    scheme, x, y, site, n_atoms, counts, elements, composition, defect, in_fov, complex_id
) -> ColumnTable:
    """The :class:`ColumnTable` of these columns, with their class ids under ``scheme``."""
    comp_keys = _composition_keys(scheme, composition, counts, elements, n_atoms, site)
    class_id = scheme.assign(site, n_atoms, defect, comp_keys)
    return ColumnTable(
        x, y, site, n_atoms, counts, elements, composition, defect, class_id, in_fov,
        complex_id, scheme,
    )  # fmt: skip


# Kept as one function (~85 lines of code): the steps (group atoms into columns, sites,
# antisites, defect kinds, empty sites, field of view) read top to bottom and share many
# per-column arrays; splitting them would mean passing a dozen arrays between helpers.
def columns_from_atoms(
    atoms: Atoms,
    *,
    tolerance: float = 0.5,
    scheme: str | Mapping | LabelScheme = "defects",
    fov_origin: tuple[float, float] | None = None,
    fov_extent: tuple[float, float] | None = None,
    find_empty_sites: bool = True,
) -> ColumnTable:
    """Derive the column table of any cell (a DFT-relaxed .xyz, a CIF, a POSCAR, ...).

    Atoms whose projected (x, y) positions lie within ``tolerance`` of each other form one
    column (single-linkage). A column holding a metal is a metal site. A chalcogen-only
    column is a chalcogen site unless its nearest columns are chalcogen columns, in which
    case it sits on a metal site (an antisite). Defect kinds are read relative to the host
    (majority) chalcogen and metal. With ``find_empty_sites``, lattice sites left empty by
    vacancies are found from the three bond directions of the lattice and added with
    ``n_atoms = 0``.

    Parameters
    ----------
    atoms : ase.Atoms
        Monolayer, normal along z; the cell's in-plane vectors need not be orthogonal.
    tolerance : float
        Projected distance [Å] within which atoms belong to one column.
    scheme : str or mapping or LabelScheme
    fov_origin, fov_extent : (float, float), optional
        Window for ``in_fov``; default the whole cell's bounding box.
    find_empty_sites : bool
        Add empty sites (vac_X2, vac_M) inferred from the lattice.
    """
    scheme = get_scheme(scheme)
    if len(atoms) == 0:
        raise ValueError("atoms: the structure holds no atoms")
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0 Å, got {tolerance}")
    xy = atoms.positions[:, :2]
    pairs = cKDTree(xy).query_pairs(tolerance, output_type="ndarray")
    from scipy.sparse import coo_matrix

    graph = coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(atoms), len(atoms))
    )
    n_col, label = connected_components(graph, directed=False)
    counts, elements = _counts_matrix(atoms.numbers, label, n_col)
    n_atoms = counts.sum(axis=1)
    cx = np.bincount(label, weights=xy[:, 0], minlength=n_col) / n_atoms
    cy = np.bincount(label, weights=xy[:, 1], minlength=n_col) / n_atoms
    is_metal_el = np.array([e not in CHALCOGENS for e in elements])
    has_metal = (
        (counts[:, is_metal_el].sum(axis=1) > 0) if is_metal_el.any() else np.zeros(n_col, bool)
    )
    site = np.where(has_metal, METAL, CHALCOGEN).astype(np.int8)
    pos = np.column_stack([cx, cy])
    if has_metal.any() and (~has_metal).any():
        # Bond length: median distance from a metal column to the nearest chalcogen-only one.
        bond = float(np.median(cKDTree(pos[~has_metal]).query(pos[has_metal], k=1)[0]))
        tree = cKDTree(pos)
        # A chalcogen-only column with no metal column within a bond but chalcogen columns
        # there sits on a metal site (an antisite); an edge column keeps >= 1 metal neighbour.
        for i in np.flatnonzero(site == CHALCOGEN):
            neigh = [j for j in tree.query_ball_point(pos[i], 1.25 * bond) if j != i]
            if len(neigh) >= 2 and not has_metal[neigh].any():
                site[i] = METAL
    chalc_el = [e for e in elements if e in CHALCOGENS]
    metal_el = [e for e in elements if e not in CHALCOGENS]
    ci = {e: elements.index(e) for e in elements}
    chalc_cols = site == CHALCOGEN
    host_x = max(chalc_el, key=lambda e: counts[chalc_cols, ci[e]].sum()) if chalc_el else None
    host_ms = [e for e in metal_el if e in METALS]
    composition = _compositions(counts, elements)
    defect = np.full(n_col, "none", dtype=object)
    for i in range(n_col):
        row = {e: int(counts[i, ci[e]]) for e in elements if counts[i, ci[e]]}
        n_x = sum(v for e, v in row.items() if e in CHALCOGENS)
        if site[i] == METAL:
            metals_here = [e for e in row if e not in CHALCOGENS]
            if not metals_here and n_x:
                defect[i] = "antisite_X1" if n_x == 1 else "antisite_X2"
            elif metals_here and metals_here[0] not in host_ms:
                defect[i] = "dopant_M"
        else:
            foreign = n_x - row.get(host_x, 0)
            if n_x == 1 and foreign == 0:
                defect[i] = "vac_X1"
            elif n_x >= 2 and foreign == 1:
                defect[i] = "sub_X1"
            elif n_x >= 2 and foreign >= 2:
                defect[i] = "sub_X2"
            elif n_x == 1 and foreign == 1:
                defect[i] = "sub_X2"  # a lone foreign chalcogen: not a host column
    x_all, y_all = cx, cy
    if find_empty_sites and has_metal.any() and (~has_metal).any():
        ex, ey, esite = _empty_sites(pos, site, atoms, tolerance)
        if len(ex):
            x_all = np.concatenate([cx, ex])
            y_all = np.concatenate([cy, ey])
            site = np.concatenate([site, esite]).astype(np.int8)
            n_atoms = np.concatenate([n_atoms, np.zeros(len(ex), int)])
            counts = np.concatenate([counts, np.zeros((len(ex), counts.shape[1]), int)])
            composition = np.concatenate([composition, np.full(len(ex), "", dtype=object)])
            defect = np.concatenate(
                [defect, np.where(esite == METAL, "vac_M", "vac_X2").astype(object)]
            )
    if fov_origin is None or fov_extent is None:
        lo = atoms.positions[:, :2].min(axis=0)
        hi = atoms.positions[:, :2].max(axis=0)
        fov_origin, fov_extent = tuple(lo - tolerance), tuple(hi - lo + 2 * tolerance)
    x0, y0 = fov_origin
    lx, ly = fov_extent
    in_fov = (x_all >= x0) & (x_all < x0 + lx) & (y_all >= y0) & (y_all < y0 + ly)
    return _labelled_table(
        scheme, x_all, y_all, site, n_atoms, counts, elements, composition, defect, in_fov,
        np.full(len(x_all), -1, dtype=np.int64),
    )  # fmt: skip


def _empty_sites(pos, site, atoms, tolerance):
    """Sites of the 2H lattice that no atom occupies (double chalcogen / metal vacancies).

    The three metal→chalcogen bond vectors are estimated from the occupied columns; each
    column predicts its three neighbours on the other sublattice, and predictions with no
    column nearby (and inside the occupied area) become empty sites.
    """
    metal = pos[site == METAL]
    chalc = pos[site == CHALCOGEN]
    if len(metal) < 3 or len(chalc) < 3:
        return np.zeros(0), np.zeros(0), np.zeros(0, np.int8)
    d, j = cKDTree(chalc).query(metal, k=1)
    bonds = chalc[j] - metal
    bond = np.median(d)
    ang = np.mod(np.arctan2(bonds[:, 1], bonds[:, 0]), 2 * np.pi / 3)
    theta0 = float(np.angle(np.mean(np.exp(3j * ang))) / 3.0)
    dirs = (
        np.array(
            [
                [np.cos(theta0 + k * 2 * np.pi / 3), np.sin(theta0 + k * 2 * np.pi / 3)]
                for k in range(3)
            ]
        )
        * bond
    )
    occupied = cKDTree(pos)
    lo, hi = pos.min(axis=0) + bond * 0.5, pos.max(axis=0) - bond * 0.5
    preds = [
        (metal[:, None, :] + dirs[None]).reshape(-1, 2),
        (chalc[:, None, :] - dirs[None]).reshape(-1, 2),
    ]
    found_x, found_y, found_s = [], [], []
    for sub, p in ((CHALCOGEN, preds[0]), (METAL, preds[1])):
        inside = np.all((p > lo) & (p < hi), axis=1)
        p = p[inside]
        if not len(p):
            continue
        dist, _ = occupied.query(p, k=1)
        p = p[dist > max(tolerance, 0.3 * bond)]
        if not len(p):
            continue
        # merge predictions of the same empty site from several neighbours
        n_grp, grp = connected_components(_pairs_graph(p, 0.3 * bond), directed=False)
        for g in range(n_grp):
            m = p[grp == g].mean(axis=0)
            found_x.append(m[0])
            found_y.append(m[1])
            found_s.append(sub)
    return np.array(found_x), np.array(found_y), np.array(found_s, dtype=np.int8)


def _pairs_graph(p, r):
    from scipy.sparse import coo_matrix

    pairs = cKDTree(p).query_pairs(r, output_type="ndarray")
    return coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(p), len(p)))
