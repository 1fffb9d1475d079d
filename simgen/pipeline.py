"""One sample from (config, seed, i): structure → ideal image → acquisition → labels.

No disk access except reading a user's structure file through ASE
(:func:`load_structure_file`, cached per process). Sample i depends only on
``(dataset.seed, i)``: its random streams are children of ``SeedSequence([seed, i])``, one
per stage, and the acquisition draws each parameter from its own child stream, so a noise
sweep (only noise settings differ) leaves the structure, optics and geometric distortions
of sample i unchanged: the paired design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simgen import acquisition as acq
from simgen import labels as lab
from simgen.backend import resolve_device, to_numpy

# random streams of a sample (order fixed forever: changing it changes every dataset)
STREAMS = ("structure", "optics", "simulation", "acquisition")

#: Version of the arithmetic that turns (config, seed, i) into a sample, stored with every
#: dataset (``sample_version``). A store is resumed and checked bit for bit only by the
#: version that made it. 1: stores made until 2026-12-02 (no attribute). 2: shot noise by
#: inversion of the Poisson CDF up to λ = 30 (other counts drawn from the same law); the
#: scan's cubic-spline prefilter and taps as compiled loops; line-jitter labels in closed
#: form along the line; the drift inverse stopped once converged and its Jacobian the
#: interpolant's own (structures, optics and noise-free images as in 1 to the last float
#: digits; labels within 2e-4 px of 1's).
SAMPLE_VERSION = 2


def sample_version(attrs) -> int:
    """The :data:`SAMPLE_VERSION` a store's samples were made with (1 before it was
    recorded)."""
    return int(attrs.get("sample_version", 1))


@dataclass(frozen=True)
class Sample:
    """One labelled sample, host (NumPy) arrays.

    Attributes
    ----------
    image : ndarray, float32 [H, W]
        Recorded image.
    mask : ndarray, uint8 [H, W]
        Class per pixel.
    columns : dict
        Column table in recorded-image pixels: ``x`` (col), ``y`` (row), ``class_id``,
        ``site``, ``n_atoms``, ``counts`` [n, E], ``elements``, ``site_index`` (row of the
        structure's column table).
    params : dict
        Every drawn value (structure, optics, acquisition), name -> float.
    noise_free : ndarray, float32 [H, W]
        The distorted image before noise (for checks; not stored).
    """

    image: np.ndarray
    mask: np.ndarray
    columns: dict
    params: dict
    noise_free: np.ndarray | None = None


def sample_streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators of sample ``index``, one per stage."""
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, children, strict=True)}


def resolve_model(cfg) -> str:
    """``auto`` → ``prism`` on a GPU, ``incoherent`` on a CPU-only machine."""
    model = cfg.simulation.model
    if model != "auto":
        return model
    return "prism" if resolve_device(cfg.simulation.device) == "gpu" else "incoherent"


def _materials(cfg) -> list[str]:
    return [str(m) for m in cfg.structure.material.args]


def dataset_elements(cfg) -> tuple[str, ...]:
    """Every element a sample of ``cfg`` can contain (order by atomic number)."""
    from ase.data import atomic_numbers

    from structures import CHALCOGENS, parse_material

    els = set()
    if cfg.structure.file:
        atoms = load_structure_file(cfg.structure.file)
        els.update(atoms.get_chemical_symbols())
    else:
        for material in _materials(cfg):
            els.update(parse_material(material))
        els.update(cfg.structure.metals or {})
        els.update(cfg.structure.chalcogens or {})
        kinds = set(cfg.structure.defects)
        if kinds & {"sub_X1", "sub_X2"}:
            els.update([cfg.structure.substituent] if cfg.structure.substituent else CHALCOGENS)
        if "dopant_M" in kinds:
            els.add(cfg.structure.dopant)
    return tuple(sorted(els, key=lambda e: atomic_numbers[e]))


def dataset_hosts(cfg) -> tuple[tuple[str, str], ...] | None:
    """The host lattices ``(metal, chalcogen)`` of ``cfg``'s samples (its materials, or the
    alloy's sublattices); None for a structure file (every pair is then a host)."""
    from structures import parse_material

    if cfg.structure.file:
        return None
    pairs = set()
    for material in _materials(cfg):
        metal, chalcogen = parse_material(material)
        metals = list(cfg.structure.metals or {metal: 1.0})
        chalcogens = list(cfg.structure.chalcogens or {chalcogen: 1.0})
        pairs.update((m, x) for m in metals for x in chalcogens)
    return tuple(sorted(pairs))


def nominal_pixel_size(cfg) -> float:
    lo, hi = cfg.optics.pixel_size_A.bounds()
    return float(lo) if lo == hi else float("nan")


def store_layout(cfg):
    """Shapes of the store for ``cfg`` (column capacity from the densest lattice)."""
    from simgen.store import StoreLayout

    h, w = cfg.dataset.image_size
    p_max = cfg.optics.pixel_size_A.bounds()[1]
    area = h * w * p_max**2
    a_min = 3.15  # smallest lattice constant in the table (WS2)
    if cfg.structure.file:
        capacity = _file_columns_capacity(cfg, area)
    else:
        capacity = int(math.ceil(1.25 * 2 * area / (a_min**2 * math.sqrt(3) / 2))) + 32
    return StoreLayout(
        n_samples=cfg.dataset.n_samples,
        image_shape=(h, w),
        column_capacity=capacity,
        elements=dataset_elements(cfg),
        param_names=param_names(cfg),
        samples_per_chunk=cfg.dataset.samples_per_chunk,
        samples_per_task=samples_per_task(cfg),
    )


#: Samples per task of the fast models (``incoherent``, ``pointsum``): a task of ~1.5 s at
#: 512², so that Zarr's per-chunk cost (~1 ms per chunk, ~60 small arrays) is paid once per
#: 16 samples, not per sample.
FAST_TASK_SAMPLES = 16


def samples_per_task(cfg) -> int:
    """Consecutive samples a worker computes and writes together (they share the chunks of
    the store's small arrays): ``dataset.samples_per_task`` when set, else
    :data:`FAST_TASK_SAMPLES` rounded to a multiple of ``dataset.samples_per_chunk`` for the
    fast models and ``samples_per_chunk`` for abTEM's (seconds to minutes per sample: a
    killed run loses at most one task per worker)."""
    k = cfg.dataset.samples_per_chunk
    if cfg.dataset.samples_per_task is not None:
        return cfg.dataset.samples_per_task
    if resolve_model(cfg) in ("incoherent", "pointsum"):
        return k * max(1, FAST_TASK_SAMPLES // k)
    return k


def _file_columns_capacity(cfg, area):
    from structures import columns_from_atoms

    atoms = load_structure_file(cfg.structure.file)
    table = columns_from_atoms(atoms)
    cell_area = abs(np.linalg.det(atoms.cell[:2, :2])) or 1.0
    return int(math.ceil(1.3 * len(table) * max(area / cell_area, 1.0))) + 32


def param_names(cfg) -> tuple[str, ...]:
    """Names of every per-sample drawn value (stable order)."""
    s = make_sample_params(cfg, 0)
    return tuple(sorted(s))


def store_attrs(cfg, calibration) -> dict:
    from structures import get_scheme

    return {
        "config": cfg.to_dict(),
        "label_scheme": get_scheme(cfg.labels.scheme).to_dict(),
        "pixel_size_A": nominal_pixel_size(cfg) if np.isfinite(nominal_pixel_size(cfg)) else None,
        "model": resolve_model(cfg),
        "calibration": calibration,
        "sample_version": SAMPLE_VERSION,
    }


def check_ready(cfg) -> None:
    """Errors that must surface before any work starts (device, structure file)."""
    resolve_device(cfg.simulation.device)
    if cfg.structure.file:
        load_structure_file(cfg.structure.file)


@lru_cache(maxsize=4)
def load_structure_file(path: str):
    """Read a user's cell with ASE (any format it knows)."""
    import ase.io

    try:
        atoms = ase.io.read(path)
    except FileNotFoundError:
        raise ValueError(f"structure.file: {path} not found") from None
    except Exception as err:
        raise ValueError(f"structure.file: ASE could not read {path}: {err}") from None
    if len(atoms) == 0:
        raise ValueError(f"structure.file: {path} holds no atoms")
    if abs(np.linalg.det(atoms.cell.array[:2, :2])) < 1e-6:
        raise ValueError(
            f"structure.file: {path} has no cell in x and y (the in-plane lattice vectors "
            "are needed to tile it; use a format that stores them, e.g. extended XYZ or CIF)"
        )
    return atoms


# -- the sample ----------------------------------------------------------------------------
def draw_structure(cfg, rng) -> dict:
    """The per-sample structure values of ``cfg`` (rotation, displacements, material,
    defect concentrations) drawn from ``rng``."""
    st = cfg.structure
    out = {
        "rotation_deg": float(st.rotation_deg.draw(rng)),
        "displacement_sigma_A": float(st.displacement_sigma_A.draw(rng, low=0.0)),
    }
    if len(st.material.args) > 1:
        out["material_index"] = float(st.material.args.index(st.material.draw(rng)))
    for kind, dist in st.defects.items():
        out[f"defect_{kind}"] = float(dist.draw(rng, low=0.0, high=1.0))
    return out


def make_sample_params(cfg, index: int) -> dict:
    """All per-sample drawn values of sample ``index`` without simulating anything."""
    streams = sample_streams(cfg.dataset.seed, index)
    params = {}
    if not cfg.structure.file:
        params.update(draw_structure(cfg, streams["structure"]))
    params.update(cfg.optics.draw(streams["optics"]))
    params.update(dict.fromkeys(acq.AcquisitionConfig.param_names(), 0.0))
    return params


def detector_nodes(cfg) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (inner, outer) detector-grid nodes [mrad] the incoherent model needs for
    ``cfg``'s drawn detector angles (:func:`simgen.incoherent.detector_grid_nodes`), or
    None for a fixed detector (one calibration)."""
    from simgen.incoherent import detector_grid_nodes

    o = cfg.optics
    dists = {"haadf_inner_mrad": o.haadf_inner_mrad, "haadf_outer_mrad": o.haadf_outer_mrad}
    if all(d.kind == "fixed" for d in dists.values()):
        return None
    for name, d in dists.items():
        if d.kind in ("normal", "lognormal"):
            raise ValueError(
                f"optics.{name}: the incoherent model is calibrated over the drawn detector "
                f"range; give a bounded distribution (fixed, uniform, loguniform or choice), "
                f"got {d.to_config()}"
            )
    return detector_grid_nodes(*(d.bounds() for d in dists.values()))


def calibration_request(cfg):
    """``(key, compute)``: the cache key of the calibration ``cfg`` needs, and a function
    computing it (a JSON-able dict). The caller (CLI/store layer) caches it on disk.

    With drawn detector angles (:func:`detector_nodes`) the calibration is a
    :class:`~simgen.incoherent.DetectorGrid`: its key starts with ``grid-`` and
    ``compute(lookup=, save=, announce=)`` takes a function returning a node's cached
    calibration (or None), one saving a newly computed node, and one told before any
    reference simulation runs; the missing nodes are calibrated together (one reference
    simulation for all of them, :func:`simgen.calibrate.calibrate_detectors`).
    """
    from simgen.calibrate import calibrate, calibrate_detectors, calibration_key
    from simgen.config import GRID_FROZEN_PHONONS
    from simgen.incoherent import DetectorGrid, detector_grid_key

    elements = dataset_elements(cfg)
    kwargs = {
        "hosts": dataset_hosts(cfg),
        "reference_model": cfg.simulation.calibration_reference,
        "potential_sampling_A": cfg.simulation.potential_sampling_A,
        "transmission_supersampling": cfg.simulation.transmission_supersampling,
    }
    nodes = detector_nodes(cfg)
    n_fp = cfg.simulation.calibration_frozen_phonons
    if n_fp is None:
        n_fp = 0 if nodes is None else GRID_FROZEN_PHONONS
    if n_fp:
        kwargs["frozen_phonons"] = n_fp
    if nodes is None:
        key = calibration_key(cfg.optics, elements, **kwargs)

        def compute(lookup=None, save=None, announce=None) -> dict:
            return calibrate(cfg.optics, elements, device=cfg.simulation.device, **kwargs).to_dict()

        return key, compute
    inner, outer = nodes
    nominal = cfg.optics.nominal()
    from simgen.simulation import check_potential_sampling

    try:  # the top node, not only the drawn range, must be resolved by the wave grid
        check_potential_sampling(
            {**nominal, "haadf_outer_mrad": outer[-1]}, cfg.simulation.potential_sampling_A
        )
    except ValueError as err:
        raise ValueError(
            f"optics.haadf_outer_mrad: the detector grid covering the drawn range needs an "
            f"outer node at {outer[-1]:g} mrad (nodes on multiples of 50 mrad), but "
            f"simulation.{err}; narrow the range or refine the sampling"
        ) from None
    detectors = [(a, b) for a in inner for b in outer]
    node_optics = [{**nominal, "haadf_inner_mrad": a, "haadf_outer_mrad": b} for a, b in detectors]
    node_keys = [calibration_key(o, elements, **kwargs) for o in node_optics]
    key = detector_grid_key(node_keys, inner, outer)

    def compute_grid(lookup=None, save=None, announce=None) -> dict:
        found = {k: (lookup(k) if lookup is not None else None) for k in node_keys}
        missing = [i for i, k in enumerate(node_keys) if found[k] is None]
        if missing:
            if announce is not None:
                announce(
                    f"calibrating the incoherent model for {len(missing)} of {len(node_keys)} "
                    f"detectors of {key} (once, then cached) ..."
                )
            cals = calibrate_detectors(
                nominal, elements, [detectors[i] for i in missing],
                device=cfg.simulation.device, **kwargs,
            )  # fmt: skip
            for i, cal in zip(missing, cals, strict=True):
                data = cal.to_dict()
                if data["key"] != node_keys[i]:
                    raise RuntimeError(f"calibration key {data['key']} != {node_keys[i]}")
                found[node_keys[i]] = data
                if save is not None:
                    save(node_keys[i], data)
        return DetectorGrid(tuple(found[k] for k in node_keys)).to_dict()

    return key, compute_grid


@lru_cache(maxsize=2)
def _calibration_object(text: str):
    import json

    from simgen.incoherent import calibration_from_dict

    return calibration_from_dict(json.loads(text))


def _build_structure(cfg, streams, fov_A, scheme):
    """Monolayer (or user cell) covering ``fov_A`` plus margin, and its column table."""
    from structures import apply_defects, build_monolayer, column_table, columns_from_atoms

    st = cfg.structure
    margin = st.margin_A
    if st.file:
        atoms = load_structure_file(st.file).copy()
        atoms, origin = _tile_cell(atoms, fov_A, margin)
        table = columns_from_atoms(atoms, scheme=scheme, fov_origin=origin, fov_extent=fov_A)
        return atoms, table, origin, {}
    r_draw, r_build, r_defects = streams["structure"].spawn(3)
    drawn = draw_structure(cfg, r_draw)
    material = st.material.args[int(drawn.get("material_index", 0))]
    alloy = st.metals is not None and st.chalcogens is not None
    ml = build_monolayer(
        None if alloy else material,
        fov=fov_A,
        metals=st.metals,
        chalcogens=st.chalcogens,
        rotation_deg=drawn["rotation_deg"],
        margin=margin,
        displacement_sigma=drawn["displacement_sigma_A"],
        rng=r_build,
    )
    spec = {k: drawn[f"defect_{k}"] for k in st.defects}
    if spec:
        ml = apply_defects(
            ml,
            spec,
            by=st.defects_by,
            substituent=st.substituent,
            dopant=st.dopant,
            complex_size=st.complex_size,
            rng=r_defects,
        )
    return ml.atoms, column_table(ml, scheme), ml.fov_origin, drawn


def structure_columns(cfg, index: int):
    """Column table of sample ``index``'s structure over the image's field of view.

    Builds the structure only (no simulation, no acquisition distortions): for counting
    what a dataset's images hold, e.g. its defect columns per image.

    Parameters
    ----------
    cfg : SimgenConfig
    index : int

    Returns
    -------
    (ColumnTable, tuple of float, tuple of float)
        The table, the field of view's origin [Å] in its coordinates and the field of
        view (width, height) [Å] at the sample's pixel size.
    """
    from structures import get_scheme

    streams = sample_streams(cfg.dataset.seed, index)
    p = float(cfg.optics.draw(streams["optics"])["pixel_size_A"])
    h, w = cfg.dataset.image_size
    fov_A = (w * p, h * p)
    _, table, origin, _ = _build_structure(cfg, streams, fov_A, get_scheme(cfg.labels.scheme))
    return table, origin, fov_A


def _tile_cell(atoms, fov_A, margin):
    """Repeat a user's (periodic) cell to cover the field of view plus margin."""
    import abtem

    if atoms.cell[2, 2] < 1e-6 or not atoms.pbc[2]:
        atoms.center(vacuum=5.0, axis=2)
    atoms.pbc = True
    atoms.wrap()
    cell = atoms.cell.array
    if abs(cell[0, 1]) > 1e-6 or abs(cell[1, 0]) > 1e-6:
        atoms = abtem.orthogonalize_cell(atoms)
    lx, ly = atoms.cell[0, 0], atoms.cell[1, 1]
    need = (fov_A[0] + 2 * margin, fov_A[1] + 2 * margin)
    reps = (max(1, math.ceil(need[0] / lx)), max(1, math.ceil(need[1] / ly)), 1)
    atoms = atoms.repeat(reps)
    origin = ((reps[0] * lx - fov_A[0]) / 2.0, (reps[1] * ly - fov_A[1]) / 2.0)
    return atoms, origin


def make_sample(cfg, index: int, *, calibration: dict | None = None) -> Sample:
    """Sample ``index`` of the dataset ``cfg``: labelled recorded image and parameters.

    Parameters
    ----------
    cfg : SimgenConfig
    index : int
        Sample index; with ``cfg.dataset.seed`` it fixes every random draw.
    calibration : dict, optional
        Incoherent-model calibration (``Calibration.to_dict()``); required for that model.
    """
    from structures import get_scheme

    streams = sample_streams(cfg.dataset.seed, index)
    optics = cfg.optics.draw(streams["optics"])
    p = float(optics["pixel_size_A"])
    h, w = cfg.dataset.image_size
    pad = acq.required_padding_px(cfg.acquisition, (h, w), p)
    fov_A = ((w + 2 * pad) * p, (h + 2 * pad) * p)
    scheme = get_scheme(cfg.labels.scheme)
    atoms, table, origin, drawn = _build_structure(cfg, streams, fov_A, scheme)
    return render_sample(
        cfg, atoms, table, origin, optics, streams, calibration=calibration, params=drawn
    )


def render_sample(
    cfg, atoms, table, origin, optics, streams, *, calibration=None, params=None
) -> Sample:
    """Image, acquisition and labels of a given structure (the second half of
    :func:`make_sample`; :mod:`simgen.movie` calls it once per frame).

    Parameters
    ----------
    cfg : SimgenConfig
    atoms : ase.Atoms
        The structure, covering the field of view ``origin + [0, (W + 2 pad) p]`` and
        likewise in y [Å].
    table : structures.ColumnTable
        Its columns.
    origin : (float, float)
        Lower-left corner of the padded field of view in the cell frame [Å].
    optics : dict
        Drawn optics (:meth:`OpticsConfig.draw`); ``pixel_size_A`` fixes the pixel size.
    streams : dict of Generator
        ``simulation`` and ``acquisition`` random streams.
    calibration : dict, optional
        Incoherent-model calibration.
    params : dict, optional
        Values recorded with the sample besides optics and acquisition.
    """
    import json

    from simgen.simulation import SimulationSettings, simulate

    drawn = dict(params or {})
    model = resolve_model(cfg)
    p = float(optics["pixel_size_A"])
    h, w = cfg.dataset.image_size
    pad = acq.required_padding_px(cfg.acquisition, (h, w), p)
    cal = None
    if model == "incoherent":
        if calibration is None:
            raise ValueError("the incoherent model needs a calibration (simgen calibrate)")
        cal = _calibration_object(json.dumps(calibration, sort_keys=True))
        # a detector grid goes to simulate as it is: it renders this sample's detector
        # from the nodes around it
    elif model == "pointsum":  # the Z^n point-sum model: the incoherent renderer, no fit
        from simgen.incoherent import pointsum_calibration

        cal = pointsum_calibration(
            dataset_elements(cfg), optics, exponent=cfg.simulation.pointsum_exponent
        )
    settings = SimulationSettings(
        model="incoherent" if model == "pointsum" else model,
        pixel_size_A=p,
        shape=(h + 2 * pad, w + 2 * pad),
        origin=origin,
        interpolation=cfg.simulation.prism_interpolation,
        frozen_phonons=cfg.simulation.frozen_phonons,
        potential_sampling_A=cfg.simulation.potential_sampling_A,
        transmission_supersampling=cfg.simulation.transmission_supersampling,
        device=cfg.simulation.device,
    )
    sim = simulate(atoms, table, optics, settings, calibration=cal, rng=streams["simulation"])
    acquired = acq.apply_acquisition(
        sim.image,
        sim.rows,
        sim.cols,
        cfg.acquisition,
        pad=pad,
        pixel_size_A=p,
        rng=streams["acquisition"],
    )
    cols = lab.column_labels(table, acquired.rows, acquired.cols, acquired.inside)
    mask = lab.class_mask(
        cols.y, cols.x, cols.class_id, (h, w), radius_px=cfg.labels.disk_radius_A / p
    )
    params = {**drawn, **optics, **acquired.params}
    columns = {
        "x": cols.x,
        "y": cols.y,
        "class_id": cols.class_id,
        "site": cols.site,
        "n_atoms": cols.n_atoms,
        "counts": cols.counts,
        "elements": tuple(table.elements),
        "site_index": cols.index,  # row of the structure's column table (its lattice site)
    }
    return Sample(
        image=to_numpy(acquired.image).astype(np.float32),
        mask=to_numpy(mask).astype(np.uint8),
        columns=columns,
        params={k: float(v) for k, v in params.items()},
        noise_free=to_numpy(acquired.noise_free).astype(np.float32),
    )
