"""The Python API for notebooks and scripts: what ``simgen generate`` does, as functions.

``simgen.generate(config, "out.zarr")`` writes (or continues) a labelled store exactly as
the CLI does, calibration included: the incoherent model's calibration is looked up in the
cache (``$SIMGEN_CACHE`` or ``~/.cache/simgen``) and computed and cached once when missing.
``simgen.simulate(atoms, optics)`` images one structure (an ``ase.Atoms`` cell or a
``structures.Monolayer``) without any acquisition noise. See ``docs/api.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["cached_calibration", "calibration_for", "generate", "load_config", "simulate"]


def load_config(config=None, **overrides):
    """A validated :class:`~simgen.config.SimgenConfig`.

    Parameters
    ----------
    config : SimgenConfig, mapping, path or None
        A config, its dict (``to_dict`` form, missing keys take the defaults), a YAML
        file, or None for the shipped default (``simgen/data/default.yaml``).
    **overrides
        Dotted keys with ``__`` for the dots, e.g. ``dataset__n_samples=8``.

    Returns
    -------
    SimgenConfig
    """
    from simgen.config import SimgenConfig
    from simgen.config import load_config as load_file

    if isinstance(config, SimgenConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = SimgenConfig.from_dict(dict(config))
    else:
        cfg = load_file(config)
    changes = {k.replace("__", "."): v for k, v in overrides.items()}
    return cfg.with_overrides(changes) if changes else cfg


def cached_calibration(
    key: str,
    compute: Callable[[], dict],
    *,
    force: bool = False,
    announce: Callable[[str], None] | None = None,
) -> dict:
    """The calibration cached under ``key``, else the one shipped with simgen
    (:mod:`simgen.calibration_table`), else ``compute()`` saved in the cache first.

    Parameters
    ----------
    key : str
        Cache key (:func:`simgen.calibrate.calibration_key`, or a detector grid's key from
        :func:`simgen.pipeline.calibration_request`).
    compute : callable
        Returns the calibration dict (``Calibration.to_dict()``); for a detector grid
        (key ``grid-...``) it is called with ``lookup``, ``save`` and ``announce`` so that
        its nodes come from the cache or the shipped table and only missing ones are
        computed (and cached).
    force : bool
        Recompute (and overwrite the cache) even when cached.
    announce : callable, optional
        Called with a message before a calibration is computed (the CLI prints it);
        the message is logged at INFO in any case.
    """
    from simgen import store
    from simgen.calibration_table import shipped_calibration

    def lookup(k):
        found = store.load_cached_calibration(k)
        if found is None:
            found = shipped_calibration(k)
            if found is not None:
                logger.info("calibration %s: shipped with simgen", k)
        return found

    data = None if force else lookup(key)
    if data is not None:
        return data
    if key.startswith("grid-"):  # a detector grid: its nodes are looked up one by one

        def tell(message):
            logger.info(message)
            if announce is not None:
                announce(message)

        data = compute(lookup=None if force else lookup, save=store.save_calibration, announce=tell)
        store.save_calibration(key, data)
        return data
    message = f"calibrating the incoherent model ({key}; once, then cached) ..."
    logger.info(message)
    if announce is not None:
        announce(message)
    data = compute()
    store.save_calibration(key, data)
    return data


def _host_lattices(atoms, elements) -> tuple[tuple[str, str], ...] | None:
    """The host lattices of a ``structures.Monolayer`` (its sublattice compositions), as
    ``simgen generate`` calibrates its datasets; None (every pair) for plain Atoms."""
    composition = getattr(atoms, "composition", None)
    if composition is None:
        return None
    metals = [m for m, _ in composition.metals if m in elements]
    chalcogens = [x for x, _ in composition.chalcogens if x in elements]
    return tuple(sorted((m, x) for m in metals for x in chalcogens)) or None


def calibration_for(
    cfg, *, force: bool = False, announce: Callable[[str], None] | None = None
) -> dict | None:
    """The calibration a dataset config needs (None unless its model is incoherent),
    from the cache or computed and cached; what ``simgen generate`` uses."""
    from simgen.pipeline import calibration_request, resolve_model

    if resolve_model(cfg) != "incoherent":
        return None
    key, compute = calibration_request(cfg)
    return cached_calibration(key, compute, force=force, announce=announce)


def generate(
    config,
    out: str | Path,
    *,
    overwrite: bool = False,
    cluster: str = "none",
    workers: int | None = None,
    progress: bool = True,
    calibration: dict | str | None = "auto",
):
    """Generate (or continue) a labelled dataset store, as ``simgen generate`` does.

    Parameters
    ----------
    config : SimgenConfig, mapping, path or None
        The dataset (see :func:`load_config`).
    out : path
        Store directory (``*.zarr``). An existing store of the same config is continued;
        one of another config is refused unless ``overwrite``.
    overwrite : bool
        Replace an existing store.
    cluster : {"none", "local", "slurm", "pbs", "lsf", "cuda"}
        Where the samples run: ``none`` (default here) computes them in this process,
        ``local`` on a Dask cluster of this machine (the CLI's default).
    workers : int, optional
        Worker processes of a cluster.
    progress : bool
        Show a progress bar.
    calibration : "auto", dict or None
        ``auto``: the cached calibration (computed once when missing); a dict to use
        that one.

    Returns
    -------
    simgen.generation.GenerateReport
        ``path``, ``n_samples``, ``computed``, ``skipped``, ``seconds``.
    """
    from simgen.cluster import ClusterSpec
    from simgen.generation import generate as run
    from simgen.pipeline import check_ready

    cfg = load_config(config)
    check_ready(cfg)
    cal = calibration_for(cfg) if calibration == "auto" else calibration
    spec = ClusterSpec(kind=cluster, workers=workers)
    return run(cfg, out, cluster=spec, overwrite=overwrite, calibration=cal, progress=progress)


def _columns_and_window(atoms, scheme, settings: dict):
    """Columns of a Monolayer (its field of view as the window, set in ``settings``) or of
    any cell."""
    from structures import Monolayer, column_table, columns_from_atoms

    if isinstance(atoms, Monolayer):
        if not any(settings.get(k) is not None for k in ("window", "shape", "origin")):
            settings["window"] = (*atoms.fov_origin, *atoms.fov_extent)
        return atoms.atoms, column_table(atoms, scheme=scheme)
    return atoms, columns_from_atoms(atoms, scheme=scheme)


def simulate(
    atoms,
    optics=None,
    settings=None,
    *,
    calibration: Any = "auto",
    scheme="defects",
    rng=None,
    **overrides,
):
    """Noise-free HAADF image of a structure, with every column's pixel position.

    Parameters
    ----------
    atoms : structures.Monolayer or ase.Atoms
        A builder monolayer (imaged over its field of view) or any orthogonal cell with
        vacuum along z (imaged whole; columns found by ``structures.columns_from_atoms``).
    optics : mapping or OpticsConfig, optional
        Optics values (missing keys take the defaults) or a config drawn with ``rng``.
    settings : SimulationSettings, optional
        Model, pixel size, window, numerical settings (default ``SimulationSettings()``).
    calibration : "auto", Calibration, dict or None
        For the incoherent model: ``auto`` takes the cached calibration for these optics
        and the structure's elements (computed against PRISM once when missing).
    scheme : str or mapping
        Label scheme of the returned column table.
    rng : Generator, int or None
        Random source (drawing an ``OpticsConfig``, frozen phonons).
    **overrides
        Fields of :class:`simgen.simulation.SimulationSettings` to change (``model``,
        ``pixel_size_A``, ``window``, ``device``...).

    Returns
    -------
    simgen.simulation.Simulated
        ``image`` (float32 [H, W]), ``rows``/``cols`` of every column and ``columns``, the
        ``structures.ColumnTable`` imaged (same order; class ids under ``scheme``).
    """
    from simgen.calibrate import calibrate, calibration_key
    from simgen.incoherent import calibration_from_dict
    from simgen.optics import OpticsConfig
    from simgen.simulation import SimulationSettings
    from simgen.simulation import simulate as run

    merged = {**(SimulationSettings() if settings is None else settings).to_dict(), **overrides}
    cell, columns = _columns_and_window(atoms, scheme, merged)
    opts = SimulationSettings.from_dict(merged)
    if opts.model != "incoherent":
        calibration = None
    elif isinstance(calibration, str) and calibration == "auto":
        nominal = optics.nominal() if isinstance(optics, OpticsConfig) else optics
        elements = tuple(columns.elements)
        hosts = _host_lattices(atoms, elements)
        calibration = cached_calibration(
            calibration_key(nominal, elements, hosts=hosts),
            lambda: calibrate(nominal, elements, device=opts.device, hosts=hosts).to_dict(),
        )
    if isinstance(calibration, Mapping):
        calibration = calibration_from_dict(calibration)  # a Calibration or a DetectorGrid
    return run(cell, columns, optics, opts, calibration=calibration, rng=rng)
