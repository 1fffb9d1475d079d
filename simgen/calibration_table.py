"""The calibrations shipped with simgen, and how to rebuild them.

A CPU user with shipped optics does not wait for a calibration: :func:`simgen.api.
cached_calibration` looks a key up in the user's cache, then in this table
(``simgen/data/calibrations.json``), and only then calibrates. The table holds the six 2H
binaries (MoS2, WS2, MoSe2, WSe2, MoTe2, WTe2) at 60 and 80 kV, 25, 30 and 35 mrad, with
one 60–200 mrad detector (a fixed detector, as ``simgen match`` writes it), plus the
dopants at 30 mrad: Re, Nb and Cr in MoS2, V, Nb and Cr in WSe2, all at the default
reference numerics
(:class:`simgen.calibrate.ReferenceSettings`: PRISM f = 1, 0.05 Å waves, potential ×4),
and detector grids (:data:`SHIPPED_GRIDS`: 80 kV, 30 mrad, inner 40–120 x outer
150–250 mrad, frozen-phonon references) for the same materials, each node an entry. The
shipped config draws its detector over that grid, so its own optics (80 kV, 30 mrad) never
wait; a drawn detector at other optics or with other dopants (Re, Nb, Cr) calibrates a
15-node grid once (3–5 minutes on two cores) and caches it.

Rebuild (about 75 minutes on two CPU cores; deterministic, CPU)::

    make calibrations        # = python -m simgen.calibration_table simgen/data/calibrations.json

Each entry is exactly what :func:`simgen.calibrate.calibrate` returns for its optics and
elements (its key says so), and the file records the abTEM, simgen and NumPy versions that
made it. A ``slow`` test recomputes one entry and compares.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "SHIPPED",
    "SHIPPED_GRIDS",
    "build_table",
    "grid_node_keys",
    "shipped_calibration",
    "shipped_entries",
    "shipped_keys",
]

#: Host binaries (metal, chalcogen) of the table.
BINARIES = (("Mo", "S"), ("W", "S"), ("Mo", "Se"), ("W", "Se"), ("Mo", "Te"), ("W", "Te"))

#: Detector of every shipped entry [mrad] (the default optics).
DETECTOR_MRAD = (60.0, 200.0)


def _entries() -> list[tuple[dict, tuple[str, ...]]]:
    out = []
    for energy in (60.0, 80.0):
        for alpha in (25.0, 30.0, 35.0):
            optics = {
                "energy_kV": energy,
                "semiangle_mrad": alpha,
                "haadf_inner_mrad": DETECTOR_MRAD[0],
                "haadf_outer_mrad": DETECTOR_MRAD[1],
            }
            out += [(optics, pair, None) for pair in BINARIES]
        optics = {
            "energy_kV": energy,
            "semiangle_mrad": 30.0,
            "haadf_inner_mrad": DETECTOR_MRAD[0],
            "haadf_outer_mrad": DETECTOR_MRAD[1],
        }
        out += [
            (optics, ("Mo", "Re", "S"), (("Mo", "S"),)),
            (optics, ("W", "V", "Se"), (("W", "Se"),)),
        ]
        out += [  # the other common dopants, each in the host it is usually grown in
            (optics, ("Mo", "Nb", "S"), (("Mo", "S"),)),
            (optics, ("Mo", "Cr", "S"), (("Mo", "S"),)),
            (optics, ("W", "Nb", "Se"), (("W", "Se"),)),
            (optics, ("W", "Cr", "Se"), (("W", "Se"),)),
        ]
    return out


#: ``(optics, elements, hosts)`` of every shipped entry (hosts: the host lattices,
#: :class:`simgen.calibrate.ReferenceSettings`; None = every pair).
SHIPPED = tuple(_entries())

#: Drawn detector ranges [mrad] the shipped detector grids cover (inner, outer): the
#: contrast-robust recipe's (docs/physics.md, "Detector angles").
GRID_INNER_MRAD = (40.0, 120.0)
GRID_OUTER_MRAD = (150.0, 250.0)


def _grids() -> list[tuple[dict, tuple[str, ...], Any, tuple]]:
    from simgen.incoherent import detector_grid_nodes

    inner, outer = detector_grid_nodes(GRID_INNER_MRAD, GRID_OUTER_MRAD)
    detectors = tuple((a, b) for a in inner for b in outer)
    optics = {"energy_kV": 80.0, "semiangle_mrad": 30.0}
    optics |= {"haadf_inner_mrad": DETECTOR_MRAD[0], "haadf_outer_mrad": DETECTOR_MRAD[1]}
    return [  # the docs' WSe2 (+ V) and the default MoS2 (+ Re) first
        (optics, ("W", "V", "Se"), (("W", "Se"),), detectors),
        (optics, ("W", "Se"), None, detectors),
        (optics, ("Mo", "Re", "S"), (("Mo", "S"),), detectors),
        (optics, ("Mo", "S"), None, detectors),
    ] + [
        (optics, pair, None, detectors)
        for pair in BINARIES
        if pair not in (("W", "Se"), ("Mo", "S"))
    ]


#: ``(optics, elements, hosts, detectors)`` of every shipped detector grid: 80 kV,
#: 30 mrad, the nodes covering :data:`GRID_INNER_MRAD` x :data:`GRID_OUTER_MRAD`, frozen-
#: phonon references (:data:`simgen.config.GRID_FROZEN_PHONONS`), as
#: :func:`simgen.pipeline.calibration_request` asks for them.
SHIPPED_GRIDS = tuple(_grids())


def grid_node_keys(optics: Mapping, elements: Iterable[str], hosts, detectors) -> list[str]:
    """The calibration keys of a detector grid's nodes."""
    from simgen.calibrate import calibration_key
    from simgen.config import GRID_FROZEN_PHONONS

    return [
        calibration_key(
            {**optics, "haadf_inner_mrad": a, "haadf_outer_mrad": b},
            tuple(elements),
            hosts=hosts,
            frozen_phonons=GRID_FROZEN_PHONONS,
        )
        for a, b in detectors
    ]


def shipped_keys() -> list[str]:
    """Every key the shipped table must hold (single calibrations and grid nodes)."""
    keys = [entry_key(o, e, h) for o, e, h in SHIPPED]
    for grid in SHIPPED_GRIDS:
        keys += grid_node_keys(*grid)
    return keys


def entry_key(optics: Mapping, elements: Iterable[str], hosts=None) -> str:
    """The calibration key of one entry."""
    from simgen.calibrate import calibration_key

    return calibration_key(dict(optics), tuple(elements), hosts=hosts)


def build_table(
    entries: Iterable[tuple[Mapping, Iterable[str], Any]] = SHIPPED,
    *,
    grids: Iterable[tuple[Mapping, Iterable[str], Any, tuple]] = SHIPPED_GRIDS,
    existing: Mapping | None = None,
    progress=None,
    checkpoint=None,
) -> dict:
    """Calibrate every entry (CPU, default reference settings); the table as a dict.

    Parameters
    ----------
    entries : iterable of (optics, elements, hosts)
    grids : iterable of (optics, elements, hosts, detectors)
        Detector grids: each node is an entry of its own; the missing nodes of a grid are
        calibrated together from one frozen-phonon reference simulation.
    existing : mapping, optional
        A previous table: entries whose key is still wanted are kept, not recomputed.
    progress : callable, optional
        Called with a line per finished entry.
    checkpoint : callable, optional
        Called with the partial table after each entry (to save it: a stopped rebuild
        resumes with ``existing``).

    Returns
    -------
    dict
        ``{"versions": {...}, "numerics": {...}, "entries": {key: calibration dict}}``.
    """
    import dataclasses
    import platform

    from simgen.calibrate import ReferenceSettings, calibrate, calibrate_detectors
    from simgen.config import GRID_FROZEN_PHONONS
    from simgen.store import package_versions

    versions = {**package_versions(), "python": platform.python_version()}  # fail early
    old = dict((existing or {}).get("entries", {}))
    table = {}
    for optics, elements, hosts in entries:
        key = entry_key(optics, elements, hosts)
        if key in old:
            table[key] = old[key]
            continue
        cal = calibrate(dict(optics), tuple(elements), device="cpu", hosts=hosts)
        data = cal.to_dict()
        data["fit"].pop("reference_seconds", None)  # machine-dependent; not a result
        table[cal.key] = data
        if progress is not None:
            progress(f"{cal.key}: corr {cal.fit['correlation']:.5f}")
        if checkpoint is not None:
            checkpoint({"versions": versions, "entries": dict(table)})
    for optics, elements, hosts, detectors in grids:
        keys = grid_node_keys(optics, elements, hosts, detectors)
        table |= {k: old[k] for k in keys if k in old}
        missing = [i for i, k in enumerate(keys) if k not in table]
        if not missing:
            continue
        cals = calibrate_detectors(
            dict(optics), tuple(elements), [detectors[i] for i in missing], device="cpu",
            hosts=hosts, frozen_phonons=GRID_FROZEN_PHONONS,
        )  # fmt: skip
        for i, cal in zip(missing, cals, strict=True):
            if cal.key != keys[i]:
                raise RuntimeError(f"calibration key {cal.key} != {keys[i]}")
            data = cal.to_dict()
            data["fit"].pop("reference_seconds", None)
            table[cal.key] = data
        if progress is not None:
            worst = min(c.fit["correlation"] for c in cals)
            progress(f"grid {''.join(elements)} {len(cals)} detectors: corr >= {worst:.5f}")
        if checkpoint is not None:
            checkpoint({"versions": versions, "entries": dict(table)})
    return {
        "versions": versions,
        "numerics": dataclasses.asdict(ReferenceSettings()),
        "entries": dict(sorted(table.items())),
    }


def shipped_entries() -> dict:
    """``{key: calibration dict}`` of the shipped table (empty if the file is missing)."""
    from simgen.store import shipped_calibration_table

    return shipped_calibration_table().get("entries", {})


def shipped_calibration(key: str) -> dict | None:
    """The shipped calibration dict with this key (a copy), or None."""
    data = shipped_entries().get(key)
    return None if data is None else json.loads(json.dumps(data))


def main(argv: list[str] | None = None) -> int:
    """``python -m simgen.calibration_table OUT.json [--keep]``: rebuild the shipped table
    (``--keep``: keep the entries of an existing OUT.json that are still current)."""
    import sys
    from pathlib import Path

    from simgen.store import atomic_write

    args = sys.argv[1:] if argv is None else argv
    keep = "--keep" in args
    args = [a for a in args if a != "--keep"]
    if len(args) != 1:
        print("usage: python -m simgen.calibration_table OUT.json [--keep]", file=sys.stderr)
        return 2
    out = Path(args[0])
    partial = out.with_name(out.name + ".partial")
    existing = None
    if keep:  # the finished table's entries and those of a stopped rebuild
        entries = {}
        for f in (out, partial):
            if f.is_file():
                entries |= json.loads(f.read_text()).get("entries", {})
        existing = {"entries": entries}

    def save_partial(table):
        atomic_write(partial, json.dumps(table, indent=1, sort_keys=True))

    table = build_table(
        existing=existing,
        progress=lambda line: print(line, flush=True),
        checkpoint=save_partial,
    )
    atomic_write(out, json.dumps(table, indent=1, sort_keys=True) + "\n")
    partial.unlink(missing_ok=True)
    print(f"{len(table['entries'])} calibrations -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
