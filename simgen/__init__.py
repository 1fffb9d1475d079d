"""Simulation-driven labelled HAADF-STEM datasets of 2D TMD monolayers.

Python API (``docs/api.md``)::

    import simgen

    report = simgen.generate(simgen.load_config(dataset__n_samples=8), "out.zarr")
    sim = simgen.simulate(monolayer, {"semiangle_mrad": 25})

The names are imported on first use, so ``import simgen`` stays cheap (no abTEM, dask or
zarr until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from simgen.api import calibration_for, generate, load_config, simulate
    from simgen.config import SimgenConfig
    from simgen.optics import OpticsConfig
    from simgen.simulation import SimulationSettings

#: Public name -> module that defines it.
_LAZY = {
    "generate": "simgen.api",
    "simulate": "simgen.api",
    "load_config": "simgen.api",
    "calibration_for": "simgen.api",
    "SimgenConfig": "simgen.config",
    "OpticsConfig": "simgen.optics",
    "SimulationSettings": "simgen.simulation",
}

__all__ = [
    "OpticsConfig",
    "SimgenConfig",
    "SimulationSettings",
    "calibration_for",
    "generate",
    "load_config",
    "simulate",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'simgen' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
