"""Human review of a label output folder: edits, their journal, corrected catalogues.

``simgen-train label`` writes one folder per image with ``columns.csv`` and
``summary.json`` (:mod:`training.experiments.label`). A reviewer changes the class of a
column (only to a class allowed on its sublattice), adds a missed column or deletes a
spurious one. :class:`ImageReview` holds one image's edits as a journal replayed on the
original catalogue (so undo is "drop the last edit"), recomputes the counts and
concentrations after every edit (:func:`~training.experiments.catalogue.summarize`), and
:meth:`ImageReview.save` writes, beside the originals and never over them:

``corrections.csv``
    One row per edit, in order: ``time`` (UTC, ISO 8601), ``image`` (folder name),
    ``columns_sha256`` (of the original ``columns.csv``: a journal is refused on another
    image), ``action`` (``change``, ``add``, ``delete``), ``column`` (row of the original
    ``columns.csv``; added columns continue the numbering), ``x_px``, ``y_px``, ``site``,
    ``old_class``, ``new_class``.
``columns_corrected.csv``
    The corrected catalogue (fields of :data:`~training.experiments.catalogue.COLUMN_FIELDS`
    plus ``column`` and ``review``: ``""``, ``changed`` or ``added``; deleted rows are
    gone). A class set by the reviewer has probability 1 and variance 0.
``summary_corrected.json``
    The original summary with the counts and concentrations recomputed on the corrected
    catalogue and a ``review`` section (edits, changed/added/deleted, time).

Opening a folder that already holds ``corrections.csv`` replays it, so a second session
resumes where the first stopped. The web app (:mod:`training.experiments.review_app`) is a
thin layer over this module; everything here works without it.

Positions are ``(x, y)`` in pixels of the labelled file (pixel centres at integers).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simgen.experiment.lattice import UNASSIGNED, allowed_sites
from simgen.store import atomic_write, write_json
from structures import CHALCOGEN, METAL
from training.experiments.catalogue import (
    COLUMN_FIELDS,
    SITE_NAMES,
    Catalogue,
    build_catalogue,
    defect_class_names,
    flatten_summary,
    read_columns_csv,
    summarize,
    vacancy_class,
    write_run_summary_csv,
)
from training.experiments.label import LABEL_MARKER

CORRECTIONS = "corrections.csv"
COLUMNS_CORRECTED = "columns_corrected.csv"
SUMMARY_CORRECTED = "summary_corrected.json"
#: Run-level summary over all reviewed images (corrected where edited).
RUN_SUMMARY_CORRECTED = "summary_corrected.csv"
CORRECTION_FIELDS = (
    "time",
    "image",
    "columns_sha256",
    "action",
    "column",
    "x_px",
    "y_px",
    "site",
    "old_class",
    "new_class",
)
ACTIONS = ("change", "add", "delete")
_SITE_CODES = {v: k for k, v in SITE_NAMES.items()}
#: Summary keys that :func:`summarize` computes (replaced in the corrected summary).
_COUNT_KEYS = (
    "area_nm2",
    "area_source",
    "n_columns",
    "n_empty_sites",
    "n_sites",
    "classes",
    "defects",
    "lattice_area_nm2",
)


class ReviewError(ValueError):
    """Bad input to a review: not a label folder, a foreign journal, a class not allowed."""


@dataclass(frozen=True)
class Edit:
    """One reviewer action on one column.

    Attributes
    ----------
    action : {"change", "add", "delete"}
    column : int
        Row of the original ``columns.csv`` (added columns continue the numbering).
    x_px, y_px : float
        Position [px].
    site : int
        ``METAL``, ``CHALCOGEN`` or ``UNASSIGNED``.
    old_class, new_class : str
        Class names before and after (``""`` for the side that does not exist: no old class
        of an added column, no new class of a deleted one).
    time : str
        When the edit was made (UTC, ISO 8601).
    """

    action: str
    column: int
    x_px: float
    y_px: float
    site: int
    old_class: str
    new_class: str
    time: str

    def to_row(self, image: str, sha: str) -> dict:
        """The ``corrections.csv`` row."""
        return {
            "time": self.time,
            "image": image,
            "columns_sha256": sha,
            "action": self.action,
            "column": self.column,
            "x_px": f"{self.x_px:.3f}",
            "y_px": f"{self.y_px:.3f}",
            "site": SITE_NAMES[self.site],
            "old_class": self.old_class,
            "new_class": self.new_class,
        }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def class_colours(names) -> list[str]:
    """``#rrggbb`` per class id, the colours of ``overlay.png`` (matplotlib tab10/tab20)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if len(names) <= 11 else "tab20"]
    return [to_hex(cmap((k - 1) % cmap.N)) for k in range(len(names))]


def find_label_images(root) -> list[str]:
    """Per-image folders of a ``simgen-train label`` output, relative to ``root``.

    A folder counts when it holds ``columns.csv`` and ``summary.json`` (a stack's frames are
    ``name/frame_000``...).

    Raises
    ------
    ReviewError
        ``root`` is missing, not a folder, has no ownership marker or no labelled image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReviewError(f"{root}: not a folder")
    if not (root / LABEL_MARKER).is_file():
        raise ReviewError(f"{root}: not a `simgen-train label` output folder (no {LABEL_MARKER})")
    names = sorted(
        p.parent.relative_to(root).as_posix()
        for p in root.rglob("columns.csv")
        if (p.parent / "summary.json").is_file() and p.parent != root
    )
    if not names:
        raise ReviewError(f"{root}: a label output folder without any labelled image")
    return names


class ImageReview:
    """The edits of one labelled image, replayed on its original catalogue.

    Parameters
    ----------
    root : path-like
        The label output folder.
    name : str
        Per-image folder relative to ``root`` (from :func:`find_label_images`).

    Raises
    ------
    ReviewError
        When the folder's ``corrections.csv`` does not belong to this image or holds an
        edit that cannot be applied (the message names the file and the row).
    """

    def __init__(self, root, name: str):
        self.root = Path(root)
        self.name = str(name)
        self.folder = self.root / self.name
        columns = self.folder / "columns.csv"
        try:
            self.summary = json.loads((self.folder / "summary.json").read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise ReviewError(f"{self.folder / 'summary.json'}: unreadable ({err})") from None
        names = (self.summary.get("model") or {}).get("class_names")
        self.scheme = {"ids": list(range(len(names))), "names": list(names)} if names else None
        try:
            self.original: Catalogue = read_columns_csv(
                columns, self.scheme, self.summary.get("pixel_size_A")
            )
        except (OSError, ValueError, KeyError) as err:
            raise ReviewError(f"{columns}: not a readable columns.csv ({err})") from None
        if self.scheme is None:
            self.scheme = {
                "ids": list(range(len(self.original.class_names))),
                "names": list(self.original.class_names),
            }
        self.class_names: tuple[str, ...] = tuple(self.original.class_names)
        self.allowed = allowed_sites(self.scheme)
        self.defects = set(defect_class_names(self.scheme))
        self.empty_classes = {
            vacancy_class(self.scheme, METAL),
            vacancy_class(self.scheme, CHALCOGEN),
        } - {0}
        self.sha = _sha256(columns)
        self.edits: list[Edit] = []
        self.revision = self.saved_revision = 0
        self._replay()
        path = self.folder / CORRECTIONS
        if path.is_file():
            self._resume(path)

    # -- state ---------------------------------------------------------------------------
    def _replay(self) -> None:
        cat = self.original
        n = len(cat)
        self.ids = np.arange(n, dtype=np.int64)
        self.x = cat.x_px.copy()
        self.y = cat.y_px.copy()
        self.site = cat.site.astype(np.int8).copy()
        self.class_id = cat.class_id.copy()
        self.probability = cat.probability.copy()
        self.variance = cat.variance.copy()
        self.detected = cat.detected.copy()
        self.status = np.array([""] * n, dtype=object)
        self.alive = np.ones(n, dtype=bool)
        for e in self.edits:
            self._apply(e)

    def _row(self, column: int) -> int:
        hit = np.flatnonzero((self.ids == column) & self.alive)
        if not len(hit):
            raise ReviewError(f"column {column}: no such column in {self.name}")
        return int(hit[0])

    def _class_id(self, name: str) -> int:
        if name not in self.class_names or name == self.class_names[0]:
            raise ReviewError(
                f"class {name!r}: not a class of this model ({', '.join(self.class_names[1:])})"
            )
        return self.class_names.index(name)

    def allowed_classes(self, site: int) -> list[str]:
        """Class names allowed on a site (every column class for an unassigned one)."""
        return [
            n
            for n, sites in self.allowed.items()
            if sites and (site == UNASSIGNED or site in sites)
        ]

    def _check_allowed(self, name: str, site: int, column: int) -> None:
        self._class_id(name)
        if name not in self.allowed_classes(site):
            raise ReviewError(
                f"class {name!r} is not allowed on the {SITE_NAMES[site]} site of column "
                f"{column} (allowed: {', '.join(self.allowed_classes(site))})"
            )

    def _apply(self, e: Edit) -> None:
        if e.action == "add":
            if e.column != self.next_id():
                raise ReviewError(f"column {e.column}: an added column must be {self.next_id()}")
            self._check_allowed(e.new_class, e.site, e.column)
            cid = self._class_id(e.new_class)
            self.ids = np.append(self.ids, e.column)
            self.x = np.append(self.x, e.x_px)
            self.y = np.append(self.y, e.y_px)
            self.site = np.append(self.site, np.int8(e.site))
            self.class_id = np.append(self.class_id, cid)
            self.probability = np.append(self.probability, 1.0)
            self.variance = np.append(self.variance, 0.0)
            self.detected = np.append(self.detected, cid not in self.empty_classes)
            self.status = np.append(self.status, np.array(["added"], dtype=object))
            self.alive = np.append(self.alive, True)
            return
        k = self._row(e.column)
        current = self.class_names[int(self.class_id[k])]
        if e.old_class != current:
            raise ReviewError(
                f"column {e.column} of {self.name} is {current!r}, the edit says {e.old_class!r}"
            )
        if e.action == "delete":
            self.alive[k] = False
            return
        if e.action != "change":
            raise ReviewError(f"action {e.action!r}: expected one of {', '.join(ACTIONS)}")
        self._check_allowed(e.new_class, int(self.site[k]), e.column)
        cid = self._class_id(e.new_class)
        self.class_id[k] = cid
        self.probability[k] = 1.0
        self.variance[k] = 0.0
        self.detected[k] = cid not in self.empty_classes
        if self.status[k] != "added":
            self.status[k] = "changed"

    def next_id(self) -> int:
        """Id the next added column gets."""
        return int(self.ids.max()) + 1 if len(self.ids) else 0

    def _resume(self, path: Path) -> None:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise ReviewError(f"{path}: unreadable ({err})") from None
        for i, r in enumerate(rows, start=2):  # line numbers of the file (header is line 1)
            if any(r.get(k) is None for k in CORRECTION_FIELDS):
                raise ReviewError(f"{path}: line {i}: not a corrections.csv row")
            if r["image"] != self.name or r["columns_sha256"] != self.sha:
                raise ReviewError(
                    f"{path}: line {i}: corrections of another image "
                    f"({r['image'] or '?'}, columns.csv {r['columns_sha256'][:12] or '?'}) "
                    f"than {self.name} (columns.csv {self.sha[:12]})"
                )
            try:
                e = Edit(
                    r["action"],
                    int(r["column"]),
                    float(r["x_px"]),
                    float(r["y_px"]),
                    _SITE_CODES[r["site"]],
                    r["old_class"],
                    r["new_class"],
                    r["time"],
                )
                self._apply(e)
            except (KeyError, ValueError) as err:
                raise ReviewError(f"{path}: line {i}: {err}") from None
            self.edits.append(e)

    # -- edits ---------------------------------------------------------------------------
    def change(self, column: int, new_class: str) -> Edit:
        """Give a column another class (allowed on its site)."""
        k = self._row(int(column))
        e = Edit(
            "change", int(column), float(self.x[k]), float(self.y[k]), int(self.site[k]),
            self.class_names[int(self.class_id[k])], str(new_class), _now(),
        )  # fmt: skip
        return self._push(e)

    def delete(self, column: int) -> Edit:
        """Remove a spurious column (or empty site)."""
        k = self._row(int(column))
        e = Edit(
            "delete", int(column), float(self.x[k]), float(self.y[k]), int(self.site[k]),
            self.class_names[int(self.class_id[k])], "", _now(),
        )  # fmt: skip
        return self._push(e)

    def add(self, x_px: float, y_px: float, new_class: str, site: int | str | None = None) -> Edit:
        """Add a missed column at ``(x_px, y_px)``.

        The site is ``site`` when given, else the only site ``new_class`` is allowed on,
        else (a class allowed on both) the sublattice opposite to the nearest column's.
        """
        x, y = float(x_px), float(y_px)
        h, w = self.shape
        inside = -0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5
        if not (math.isfinite(x) and math.isfinite(y) and inside):
            raise ReviewError(f"position ({x_px}, {y_px}): outside the {w}x{h} px image")
        if isinstance(site, str):
            if site not in _SITE_CODES:
                raise ReviewError(f"site {site!r}: expected metal, chalcogen or unassigned")
            site = _SITE_CODES[site]
        if site is None:
            sites = self.allowed.get(str(new_class), ())
            self._class_id(str(new_class))
            if len(sites) == 1:
                site = sites[0]
            else:
                on = self.alive & (self.site != UNASSIGNED)
                if on.any():
                    d = np.hypot(self.x[on] - x, self.y[on] - y)
                    site = 1 - int(self.site[on][np.argmin(d)])
                else:
                    site = UNASSIGNED
        e = Edit("add", self.next_id(), x, y, int(site), "", str(new_class), _now())
        return self._push(e)

    def _push(self, e: Edit) -> Edit:
        self._apply(e)  # validates; raises before anything changes
        self.edits.append(e)
        self.revision += 1
        return e

    def undo(self) -> Edit | None:
        """Take back the last edit (None when there is none)."""
        if not self.edits:
            return None
        e = self.edits.pop()
        self._replay()
        self.revision += 1
        return e

    @property
    def dirty(self) -> bool:
        """Edits made or undone since the last save (or the load)."""
        return self.revision != self.saved_revision

    # -- results -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` [px] of the labelled image."""
        shape = self.summary.get("image_shape")
        if shape:
            return int(shape[0]), int(shape[1])
        return (
            int(np.ceil(np.nanmax(self.original.y_px))) + 1,
            int(np.ceil(np.nanmax(self.original.x_px))) + 1,
        )

    @property
    def pixel_size_A(self) -> float:
        """[Å/px]."""
        return float(self.original.pixel_size_A)

    def catalogue(self) -> Catalogue:
        """The corrected catalogue (deleted rows left out)."""
        a = self.alive
        return build_catalogue(
            np.column_stack([self.x[a], self.y[a]]),
            self.class_id[a],
            self.scheme,
            self.pixel_size_A,
            site=self.site[a],
            probability=self.probability[a],
            variance=self.variance[a],
            detected=self.detected[a],
        )

    def counts(self) -> dict:
        """:func:`summarize` of the corrected catalogue (same area and lattice constant)."""
        lattice = self.summary.get("lattice") or {}
        a = lattice.get("lattice_constant_table_A") or lattice.get("lattice_constant_measured_A")
        return summarize(
            self.catalogue(),
            self.scheme,
            self.shape,
            self.pixel_size_A,
            lattice_constant_A=a if "lattice_area_nm2" in self.summary else None,
        )

    def columns(self) -> list[dict]:
        """Current sites as JSON-ready dicts (``column`` id, position, class...)."""
        out = []
        for k in np.flatnonzero(self.alive):
            p, v = float(self.probability[k]), float(self.variance[k])
            out.append(
                {
                    "column": int(self.ids[k]),
                    "x": float(self.x[k]),
                    "y": float(self.y[k]),
                    "site": SITE_NAMES[int(self.site[k])],
                    "class_id": int(self.class_id[k]),
                    "probability": p if math.isfinite(p) else None,
                    "variance": v if math.isfinite(v) else None,
                    "detected": bool(self.detected[k]),
                    "review": str(self.status[k]),
                }
            )
        return out

    def corrected_summary(self) -> dict:
        """The original summary with counts recomputed and a ``review`` section."""
        out = {k: v for k, v in self.summary.items() if k not in _COUNT_KEYS}
        out.update(self.counts())
        kinds = [e.action for e in self.edits]
        out["review"] = {
            "edits": len(self.edits),
            "changed": int(np.sum(self.alive & (self.status == "changed"))),
            "added": int(np.sum(self.alive & (self.status == "added"))),
            "deleted": int(np.sum(~self.alive[: len(self.original)])),
            "actions": {a: kinds.count(a) for a in ACTIONS},
            "corrections": CORRECTIONS,
            "columns_sha256": self.sha,
            "saved": _now(),
            "note": "counts and concentrations from the corrected catalogue; quality figures "
            "are those of the network's labelling",
        }
        return out

    def save(self) -> dict[str, Path]:
        """Write ``corrections.csv``, ``columns_corrected.csv`` and ``summary_corrected.json``
        (atomically, beside the originals)."""
        rows = [e.to_row(self.name, self.sha) for e in self.edits]

        def write_journal(fh):
            writer = csv.DictWriter(fh, CORRECTION_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

        paths = {CORRECTIONS: atomic_write(self.folder / CORRECTIONS, write_journal)}
        cat = self.catalogue()
        records = cat.to_records()
        ids = self.ids[self.alive]
        status = self.status[self.alive]
        fields = ("column", *COLUMN_FIELDS, "review")

        def write_columns(fh):
            writer = csv.writer(fh)
            writer.writerow(fields)
            for k, rec in enumerate(records):
                row = [str(int(ids[k]))]
                for key in COLUMN_FIELDS:
                    v = rec[key]
                    if key in ("x_px", "y_px", "x_A", "y_A"):
                        row.append(f"{v:.3f}")
                    elif isinstance(v, bool):
                        row.append("1" if v else "0")
                    elif isinstance(v, float):
                        row.append("" if not math.isfinite(v) else f"{v:.6g}")
                    else:
                        row.append(str(v))
                row.append(str(status[k]))
                writer.writerow(row)

        paths[COLUMNS_CORRECTED] = atomic_write(self.folder / COLUMNS_CORRECTED, write_columns)
        paths[SUMMARY_CORRECTED] = write_json(
            self.corrected_summary(), self.folder / SUMMARY_CORRECTED, ensure_ascii=False
        )
        self.saved_revision = self.revision
        return paths

    def read_image(self) -> np.ndarray:
        """The labelled image [H, W] (float32) from the file named in ``summary.json``.

        Raises
        ------
        ReviewError
            The source file is gone or no longer matches the catalogue's image size.
        """
        from simgen.experiment.readers import ReaderError, read_image

        source = self.summary.get("source")
        if not source or not Path(source).is_file():
            raise ReviewError(f"{self.name}: source image {source!r} not found")
        frame = self.summary.get("frame")
        try:
            images = read_image(
                source, pixel_size_A=self.pixel_size_A, frame=frame, calibrate="file"
            )
        except (ReaderError, ValueError) as err:
            raise ReviewError(f"{self.name}: source image {source}: {err}") from None
        # a stack labelled with --sum-frames has no frame: the sum of its frames
        data = np.sum([np.asarray(im.data, dtype=np.float64) for im in images], axis=0)
        data = data.astype(np.float32)
        if data.shape != self.shape:
            raise ReviewError(
                f"{self.name}: source image {source} is {data.shape}, the labels are for "
                f"{self.shape}"
            )
        return data


def write_corrected_run_summary(root, reviews) -> Path:
    """``summary_corrected.csv`` at the run root: one row per image of ``reviews`` (a
    mapping name -> :class:`ImageReview`), counts from the corrected catalogue."""
    rows = []
    for name, rv in reviews.items():
        s = rv.corrected_summary()
        rows.append(
            flatten_summary(
                s,
                image=name,
                source=s.get("source", ""),
                frame=s.get("frame"),
                status="reviewed" if rv.edits else "unchanged",
                edits=len(rv.edits),
            )
        )
    return write_run_summary_csv(rows, Path(root) / RUN_SUMMARY_CORRECTED)
