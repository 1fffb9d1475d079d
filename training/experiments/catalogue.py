"""Column catalogue of a labelled experimental image, its summary and the files written.

A :class:`Catalogue` holds one row per lattice site: every detected column, plus the empty
lattice sites found by :func:`simgen.experiment.lattice.find_empty_sites` (``detected = False``).
:func:`summarize` turns it into counts per class and concentrations per nm², per cm² and per
eligible site; :func:`write_columns_csv`, :func:`write_summary_json` and
:func:`write_run_summary_csv` write ``columns.csv``, ``summary.json`` and a run-level CSV.

Units: positions in px and Å (``x_A = x_px · pixel_size_A``, origin at the centre of pixel
(0, 0)); areas in nm² (1 nm² = 100 Å²); areal concentrations in nm⁻² and cm⁻²
(1 cm² = 10¹⁴ nm²).
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simgen.experiment.lattice import (
    UNASSIGNED,
    LatticeFit,
    allowed_sites,
    constrain_probabilities,
    scheme_names,
)
from simgen.store import atomic_write, write_json
from structures import CHALCOGEN, METAL, defect_classes

#: Columns of ``columns.csv``, in order.
COLUMN_FIELDS = (
    "x_px",
    "y_px",
    "x_A",
    "y_A",
    "site",
    "class_id",
    "class_name",
    "probability",
    "variance",
    "detected",
)
SITE_NAMES = {METAL: "metal", CHALCOGEN: "chalcogen", UNASSIGNED: "unassigned"}
_SITE_CODES = {v: k for k, v in SITE_NAMES.items()}
NM2_PER_CM2 = 1e14
A2_PER_NM2 = 100.0

#: Class name given to an empty site of each sublattice, first one present in the scheme.
_VACANCY_NAMES = {
    METAL: ("vac_M", "metal_vacancy"),
    CHALCOGEN: ("vac_X2", "vac_X", "2vacancy"),
}


@dataclass(frozen=True)
class Catalogue:
    """One row per lattice site of an image (detected columns and empty sites).

    Attributes
    ----------
    x_px, y_px : ndarray of float, shape (N,)
        Position [px] (x along columns, y along rows).
    site : ndarray of int8, shape (N,)
        ``METAL`` (0), ``CHALCOGEN`` (1) or ``UNASSIGNED`` (−1).
    class_id : ndarray of int64, shape (N,)
    probability : ndarray of float, shape (N,)
        Probability of the chosen class (NaN when unknown).
    variance : ndarray of float, shape (N,)
        Ensemble variance of that probability (NaN when unknown).
    detected : ndarray of bool, shape (N,)
        False for an empty lattice site (no column detected there).
    pixel_size_A : float
        [Å/px].
    class_names : tuple of str
        Name of each class id.
    summary : dict or None
        The labelled image's summary (quality figures included) when the catalogue comes
        from :func:`training.label`.
    """

    x_px: np.ndarray
    y_px: np.ndarray
    site: np.ndarray
    class_id: np.ndarray
    probability: np.ndarray
    variance: np.ndarray
    detected: np.ndarray
    pixel_size_A: float
    class_names: tuple[str, ...]
    summary: dict | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.x_px)

    @property
    def x_A(self) -> np.ndarray:
        """x [Å]."""
        return self.x_px * self.pixel_size_A

    @property
    def y_A(self) -> np.ndarray:
        """y [Å]."""
        return self.y_px * self.pixel_size_A

    @property
    def positions_px(self) -> np.ndarray:
        """``(x, y)`` [px], shape (N, 2)."""
        return np.column_stack([self.x_px, self.y_px])

    @property
    def class_name(self) -> np.ndarray:
        """Class name of each row."""
        names = np.array(self.class_names, dtype=object)
        return names[self.class_id]

    def select(self, keep) -> Catalogue:
        """Rows where ``keep`` (bool mask or indices) holds."""
        return Catalogue(
            self.x_px[keep],
            self.y_px[keep],
            self.site[keep],
            self.class_id[keep],
            self.probability[keep],
            self.variance[keep],
            self.detected[keep],
            self.pixel_size_A,
            self.class_names,
        )

    def to_records(self) -> list[dict]:
        """One dict per row with the fields of :data:`COLUMN_FIELDS`."""
        names = self.class_name
        return [
            {
                "x_px": float(self.x_px[k]),
                "y_px": float(self.y_px[k]),
                "x_A": float(self.x_px[k] * self.pixel_size_A),
                "y_A": float(self.y_px[k] * self.pixel_size_A),
                "site": SITE_NAMES[int(self.site[k])],
                "class_id": int(self.class_id[k]),
                "class_name": str(names[k]),
                "probability": float(self.probability[k]),
                "variance": float(self.variance[k]),
                "detected": bool(self.detected[k]),
            }
            for k in range(len(self))
        ]


def _per_row(values, n: int, what: str) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {arr.shape}")
    return arr


def build_catalogue(
    positions_px,
    class_id,
    scheme,
    pixel_size_A: float,
    *,
    site,
    probability=None,
    variance=None,
    detected=None,
) -> Catalogue:
    """Assemble a :class:`Catalogue` from per-site arrays.

    Parameters
    ----------
    positions_px : array_like, shape (N, 2)
        ``(x, y)`` [px].
    class_id : array_like of int, shape (N,)
    scheme : str, mapping or label scheme
        Gives the class names (:func:`simgen.experiment.lattice.scheme_names`).
    pixel_size_A : float
        [Å/px].
    site : array_like of int, shape (N,)
        ``METAL``, ``CHALCOGEN`` or ``UNASSIGNED``.
    probability, variance : array_like, shape (N,), optional
    detected : array_like of bool, shape (N,), optional
        Default all True.
    """
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    if not (
        isinstance(pixel_size_A, numbers.Real) and math.isfinite(pixel_size_A) and pixel_size_A > 0
    ):
        raise ValueError(f"pixel_size_A: expected > 0 Å/px, got {pixel_size_A!r}")
    names = scheme_names(scheme)
    cid = np.asarray(class_id, dtype=np.int64).reshape(-1)
    if cid.shape != (n,):
        raise ValueError(f"class_id: expected shape ({n},), got {cid.shape}")
    if n and (cid.min() < 0 or cid.max() >= len(names)):
        raise ValueError(f"class_id: ids must be in [0, {len(names) - 1}] for this scheme")
    s = np.asarray(site, dtype=np.int8).reshape(-1)
    if s.shape != (n,) or not np.all(np.isin(s, (METAL, CHALCOGEN, UNASSIGNED))):
        raise ValueError(f"site: expected ({n},) values in {{0, 1, -1}}")
    det = np.ones(n, dtype=bool) if detected is None else np.asarray(detected, dtype=bool)
    if det.shape != (n,):
        raise ValueError(f"detected: expected shape ({n},), got {det.shape}")
    return Catalogue(
        pos[:, 0].copy(),
        pos[:, 1].copy(),
        s,
        cid,
        _per_row(probability, n, "probability"),
        _per_row(variance, n, "variance"),
        det,
        float(pixel_size_A),
        names,
    )


def vacancy_class(scheme, site: int) -> int:
    """Class id for an empty site of ``site`` (``vac_M``, ``vac_X2``/``vac_X``, ...); 0 if none."""
    names = scheme_names(scheme)
    for name in _VACANCY_NAMES[site]:
        if name in names:
            return names.index(name)
    return 0


def catalogue_from_lattice(
    fit: LatticeFit,
    positions_px,
    probs,
    scheme,
    pixel_size_A: float,
    *,
    variance=None,
    empty_probs=None,
) -> Catalogue:
    """Catalogue of detected columns and empty sites, with the site constraint applied.

    Each detected column takes the most probable class allowed on its site
    (:func:`~simgen.experiment.lattice.apply_site_constraint`); its ``probability`` is
    that class's probability renormalised over the allowed classes. Empty sites take the same
    rule on
    ``empty_probs`` when given (the network's probabilities sampled there), else the
    scheme's vacancy class for their site (:func:`vacancy_class`) with NaN probability.

    Parameters
    ----------
    fit : LatticeFit
        From :func:`simgen.experiment.lattice.fit_lattice` on ``positions_px``.
    positions_px : array_like, shape (N, 2)
    probs : array_like, shape (N, K)
        Per-column class probabilities (ensemble mean).
    scheme : str, mapping or label scheme
    pixel_size_A : float
    variance : array_like, shape (N, K) or (N,), optional
        Ensemble variance per class (the chosen class's is kept) or per column.
    empty_probs : array_like, shape (M, K), optional
        Probabilities at ``fit.empty_xy``.
    """
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[0] != len(pos):
        raise ValueError(f"probs: expected {len(pos)} rows, got {p.shape}")
    q = constrain_probabilities(p, fit.site, scheme)
    cid = np.argmax(q, axis=1)
    prob = q[np.arange(len(q)), cid]
    var = None
    if variance is not None:
        v = np.asarray(variance, dtype=np.float64)
        var = v[np.arange(len(v)), cid] if v.ndim == 2 else v
    m = len(fit.empty_xy)
    if empty_probs is not None:
        qe = constrain_probabilities(empty_probs, fit.empty_site, scheme)
        e_cid = np.argmax(qe, axis=1)
        e_prob = qe[np.arange(m), e_cid]
    else:
        e_cid = np.array([vacancy_class(scheme, int(s)) for s in fit.empty_site], dtype=np.int64)
        e_prob = np.full(m, np.nan)
    return build_catalogue(
        np.concatenate([pos, fit.empty_xy.reshape(-1, 2)]),
        np.concatenate([cid, e_cid]),
        scheme,
        pixel_size_A,
        site=np.concatenate([fit.site, fit.empty_site]),
        probability=np.concatenate([prob, e_prob]),
        variance=None if var is None else np.concatenate([var, np.full(m, np.nan)]),
        detected=np.concatenate([np.ones(len(pos), bool), np.zeros(m, bool)]),
    )


def defect_class_names(scheme) -> tuple[str, ...]:
    """Classes counted as defects: vacancies, substitutions, antisites, dopants, ``other``,
    and single chalcogens (``S``, ``Se``, ``Te``: a chalcogen vacancy in the composition
    scheme). Host classes (``metal``, ``chalcogen``, ``Mo``, ``S2``, alloy pairs such as
    ``SSe``) are not."""
    return tuple(defect_classes(scheme_names(scheme)))


def _inside(cat: Catalogue, shape, mask) -> np.ndarray:
    h, w = shape
    r, c = np.rint(cat.y_px).astype(np.int64), np.rint(cat.x_px).astype(np.int64)
    keep = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != (h, w):
            raise ValueError(f"mask: expected shape {(h, w)}, got {m.shape}")
        keep[keep] = m[r[keep], c[keep]]
    return keep


def summarize(
    catalogue: Catalogue,
    scheme,
    image_shape: tuple[int, int],
    pixel_size_A: float,
    mask=None,
    *,
    lattice_constant_A: float | None = None,
) -> dict:
    """Counts and concentrations of each class in an image.

    The analysed area is the ``mask`` (True = analysed) when given, else the whole image;
    only catalogue rows inside it count. For each class (background excluded):

    * ``count`` and ``count_err`` (Poisson, √count);
    * ``per_nm2`` = count / area [nm⁻²] and ``per_cm2`` = per_nm2 · 10¹⁴ [cm⁻²], with
      ``per_cm2_err`` from ``count_err``;
    * ``per_site`` = count / number of eligible sites: metal-site classes per metal site,
      chalcogen-site classes per chalcogen site
      (:func:`~simgen.experiment.lattice.allowed_sites`),
      others per site of either kind. Sites are all catalogue rows of that site, detected
      or empty.

    Parameters
    ----------
    catalogue : Catalogue
    scheme : str, mapping or label scheme
    image_shape : (H, W)
        [px].
    pixel_size_A : float
        [Å/px].
    mask : array_like of bool, shape (H, W), optional
    lattice_constant_A : float, optional
        With it, ``lattice_area_nm2`` = metal sites × unit-cell area (a²√3/2) is reported:
        the area the lattice actually covers.

    Returns
    -------
    dict
        JSON-ready: ``area_nm2``, ``area_source``, ``n_columns``, ``n_sites``,
        ``classes`` (name -> numbers above), ``defects`` (totals over
        :func:`defect_class_names`), ...
    """
    if not (
        isinstance(pixel_size_A, numbers.Real) and math.isfinite(pixel_size_A) and pixel_size_A > 0
    ):
        raise ValueError(f"pixel_size_A: expected > 0 Å/px, got {pixel_size_A!r}")
    h, w = (int(v) for v in image_shape)
    names = scheme_names(scheme)
    if tuple(catalogue.class_names) != tuple(names):
        raise ValueError("scheme: the catalogue's class names differ from the scheme's")
    cat = catalogue.select(_inside(catalogue, (h, w), mask))
    pix_nm2 = pixel_size_A**2 / A2_PER_NM2
    if mask is not None:
        area = float(np.count_nonzero(mask)) * pix_nm2
        area_source = "mask"
    else:
        area = h * w * pix_nm2
        area_source = "image"
    n_sites = {
        "metal": int(np.sum(cat.site == METAL)),
        "chalcogen": int(np.sum(cat.site == CHALCOGEN)),
        "unassigned": int(np.sum(cat.site == UNASSIGNED)),
    }
    allowed = allowed_sites(scheme)
    classes = {}
    for cid, name in enumerate(names):
        if cid == 0 or name.startswith("unused_"):
            continue
        n = int(np.sum(cat.class_id == cid))
        sites = allowed[name]
        if sites == (METAL,):
            eligible, n_eligible = "metal", n_sites["metal"]
        elif sites == (CHALCOGEN,):
            eligible, n_eligible = "chalcogen", n_sites["chalcogen"]
        else:
            eligible, n_eligible = "any", n_sites["metal"] + n_sites["chalcogen"]
        err = math.sqrt(n)
        classes[name] = {
            "class_id": cid,
            "count": n,
            "count_err": err,
            "per_nm2": n / area if area > 0 else math.nan,
            "per_cm2": n / area * NM2_PER_CM2 if area > 0 else math.nan,
            "per_cm2_err": err / area * NM2_PER_CM2 if area > 0 else math.nan,
            "eligible_site": eligible,
            "n_eligible_sites": n_eligible,
            "per_site": n / n_eligible if n_eligible > 0 else math.nan,
        }
    defect_names = defect_class_names(scheme)
    n_def = sum(classes[nm]["count"] for nm in defect_names if nm in classes)
    out = {
        "image_shape": [h, w],
        "pixel_size_A": float(pixel_size_A),
        "area_nm2": area,
        "area_source": area_source,
        "n_columns": int(np.sum(cat.detected)),
        "n_empty_sites": int(np.sum(~cat.detected)),
        "n_sites": n_sites,
        "classes": classes,
        "defects": {
            "classes": list(defect_names),
            "count": n_def,
            "per_nm2": n_def / area if area > 0 else math.nan,
            "per_cm2": n_def / area * NM2_PER_CM2 if area > 0 else math.nan,
        },
    }
    if lattice_constant_A is not None:
        cell_nm2 = lattice_constant_A**2 * math.sqrt(3) / 2 / A2_PER_NM2
        out["lattice_area_nm2"] = n_sites["metal"] * cell_nm2
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, float | np.floating):
        return "" if not math.isfinite(value) else f"{float(value):.6g}"
    return str(value)


def write_columns_csv(catalogue: Catalogue, path) -> Path:
    """Write ``columns.csv``: one row per site, fields :data:`COLUMN_FIELDS`.

    Positions to 0.001 px / Å, probabilities to 6 significant digits, NaN as an empty
    cell, ``detected`` as 1/0.
    """

    def write(fh):
        writer = csv.writer(fh)
        writer.writerow(COLUMN_FIELDS)
        for rec in catalogue.to_records():
            row = []
            for key in COLUMN_FIELDS:
                v = rec[key]
                if key in ("x_px", "y_px", "x_A", "y_A"):
                    row.append(f"{v:.3f}")
                else:
                    row.append(_fmt(v))
            writer.writerow(row)

    return atomic_write(path, write)


def read_columns_csv(path, scheme=None, pixel_size_A: float | None = None) -> Catalogue:
    """Read a ``columns.csv`` back into a :class:`Catalogue`.

    Parameters
    ----------
    path : path-like
    scheme : optional
        Class names; default rebuilt from the file (ids it lacks named ``unused_<id>``).
    pixel_size_A : float, optional
        Default from the ratio of the Å and px columns.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = set(COLUMN_FIELDS) - set(rows[0] if rows else COLUMN_FIELDS)
    if missing:
        raise ValueError(f"{path}: not a columns.csv (missing {sorted(missing)})")

    def num(key):
        return np.array([float(r[key]) if r[key] != "" else np.nan for r in rows])

    cid = np.array([int(r["class_id"]) for r in rows], dtype=np.int64)
    if scheme is None:
        top = int(cid.max()) if len(cid) else 0
        names = ["background"] + [f"unused_{i}" for i in range(1, top + 1)]
        for r in rows:
            names[int(r["class_id"])] = r["class_name"]
        scheme = {"ids": list(range(len(names))), "names": names}
    x_px, x_a = num("x_px"), num("x_A")
    if pixel_size_A is None:
        big = np.abs(x_px) > 1.0
        pixel_size_A = float(np.median(x_a[big] / x_px[big])) if np.any(big) else 1.0
    return build_catalogue(
        np.column_stack([x_px, num("y_px")]),
        cid,
        scheme,
        pixel_size_A,
        site=np.array([_SITE_CODES[r["site"]] for r in rows], dtype=np.int8),
        probability=num("probability"),
        variance=num("variance"),
        detected=np.array([r["detected"] in ("1", "True", "true") for r in rows], dtype=bool),
    )


def write_summary_json(summary: Mapping, path) -> Path:
    """Write a :func:`summarize` result (or any plain dict) as indented JSON; NaN as null."""
    return write_json(summary, path, ensure_ascii=False)


def flatten_summary(summary: Mapping, **extra) -> dict:
    """One flat row of a :func:`summarize` result for the run-level CSV.

    Keys: ``extra`` first (e.g. ``image=...``), then ``pixel_size_A``, ``area_nm2``,
    ``n_columns``, ``n_empty_sites``, ``n_metal_sites``, ``n_chalcogen_sites``,
    ``n_unassigned``, ``defects_count``, ``defects_per_cm2``, then per class
    ``count_<name>``, ``per_cm2_<name>``, ``per_site_<name>``, then the quality figures
    ``quality_<figure>`` (verdict and reasons included) and the FFT calibration's
    ``calibration_<figure>`` when present.
    """
    row = dict(extra)
    for key in ("pixel_size_A", "area_nm2", "n_columns", "n_empty_sites"):
        if key in summary:
            row[key] = summary[key]
    sites = summary.get("n_sites", {})
    row["n_metal_sites"] = sites.get("metal")
    row["n_chalcogen_sites"] = sites.get("chalcogen")
    row["n_unassigned"] = sites.get("unassigned")
    defects = summary.get("defects", {})
    row["defects_count"] = defects.get("count")
    row["defects_per_cm2"] = defects.get("per_cm2")
    for name, c in summary.get("classes", {}).items():
        row[f"count_{name}"] = c["count"]
        row[f"per_cm2_{name}"] = c["per_cm2"]
        row[f"per_site_{name}"] = c["per_site"]
    for section in ("quality", "calibration"):
        for key, value in (summary.get(section) or {}).items():
            if isinstance(value, list | tuple):
                value = "; ".join(str(v) for v in value)
            row[f"{section}_{key}"] = value
    return row


def write_run_summary_csv(rows: Iterable[Mapping], path) -> Path:
    """Write one row per image of a run.

    Rows are flat dicts (e.g. :func:`flatten_summary` results); a row that is a nested
    :func:`summarize` result is flattened first. The header is the union of the keys in
    first-seen order; missing values are empty cells.
    """
    flat = [flatten_summary(r) if isinstance(r.get("classes"), Mapping) else dict(r) for r in rows]
    header: list[str] = []
    for r in flat:
        header.extend(k for k in r if k not in header)

    def write(fh):
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in flat:
            writer.writerow(["" if r.get(k) is None else _fmt(r[k]) for k in header])

    return atomic_write(path, write)
