"""Image stacks with ground truth: one structure evolving under the beam, frame by frame.

``simgen movie -c CFG -o stack.zarr --frames N``. The structure is built once (the
ordinary builder over the union of every frame's field of view), the event process of
:mod:`simgen.dynamics` changes it between frames, the stage drifts, and each frame goes
through the ordinary image model, acquisition chain and labels
(:func:`simgen.pipeline.render_sample`). The store is an ordinary simgen store (one sample
per frame) plus the movie's tables:

- ``columns/site_index``: lattice site of each column slot (the identity of a site over
  the frames; index into ``sites/``),
- ``sites/x_A``, ``sites/y_A``, ``sites/sublattice``: the lattice sites (cell frame, Å),
- ``events/frame``, ``events/kind`` (codes of :data:`simgen.dynamics.EVENT_KINDS`),
  ``events/from_site``, ``events/to_site``: every event; an event of frame f happened
  between frames f − 1 and f,
- ``params/stage_dx_A``, ``params/stage_dy_A``: the specimen's drift in the image at each
  frame [Å].

Frame f depends only on (seed, f): the events of frame f are drawn from their own stream
``SeedSequence([seed, f, 17])`` and the structure at frame f is the replay of frames
1..f (cheap, no image); optics are drawn once (frame 0's stream), the acquisition of
frame f from frame f's stream. Resuming recomputes exactly the unfinished frames.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from simgen import store
from simgen.config import DEFAULT_CONFIG_FILE, SimgenConfig
from simgen.dynamics import EVENT_KINDS, DynamicsConfig, StageDriftConfig

MOVIE_STREAM = 17  #: third entropy word of a movie's own streams
MOVIE_PARAMS = ("stage_dx_A", "stage_dy_A", "dose_e_per_A2")
#: Initial defect kinds a movie can start from (per-atom occupancy must describe them).
MOVIE_DEFECTS = ("vac_X1", "vac_X2", "vac_M", "dopant_M", "sub_X1", "sub_X2")

#: What a movie changes in the dataset defaults (merged under the user's file).
MOVIE_DEFAULTS = {
    "structure": {
        "rotation_deg": {"uniform": [0.0, 60.0]},
        "defects": {"vac_X1": 0.005, "dopant_M": 0.004},
        "dopant": "Re",
    },
    "acquisition": {"contamination": {"rel": 0.05}, "shot": {"lambda_counts": 15.0}},
    "dataset": {"n_samples": 20, "image_size": [256, 256]},
}


@dataclass(frozen=True)
class MovieConfig(SimgenConfig):
    """A dataset config plus what happens between frames (``dataset.n_samples`` is the
    number of frames)."""

    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    stage_drift: StageDriftConfig = field(default_factory=StageDriftConfig)

    def __post_init__(self):
        unknown = set(self.structure.defects) - set(MOVIE_DEFECTS)
        if unknown:
            raise ValueError(
                f"structure.defects: a movie starts from {MOVIE_DEFECTS} only, got "
                f"{sorted(unknown)}"
            )
        if self.structure.file:
            raise ValueError("structure.file: a movie needs the builder (no user cell)")


_REPLACED = {"defects", "cross_section_barn"}  # mappings a user's file replaces whole


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACED:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_movie_config(path: str | Path | None = None) -> MovieConfig:
    """The dataset defaults, then :data:`MOVIE_DEFAULTS`, then the user's YAML ``path``."""
    data = _merge(yaml.safe_load(DEFAULT_CONFIG_FILE.read_text()), MOVIE_DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(user, dict):
            raise ValueError(f"{path}: a config is a YAML mapping at top level")
        data = _merge(data, user)
    return MovieConfig.from_dict(data)


@dataclass(frozen=True)
class MoviePlan:
    """Everything of a movie that does not depend on the frame's image: structure, states,
    events, drift (computed once per process)."""

    pristine: object
    lattice: object
    states: list
    events: list  # (frame, kind, from_site, to_site)
    drift_A: np.ndarray
    origins: np.ndarray
    optics: dict
    drawn: dict
    dose_e_per_A2: float
    scheme: object = dataclasses.field(repr=False)


def movie_streams(seed: int, frame: int) -> np.random.Generator:
    """The movie's own generator of ``frame`` (frame 0: drift, structure, hot regions)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(frame), MOVIE_STREAM]))


def plan_movie(cfg: MovieConfig) -> MoviePlan:
    """Build the structure, replay the events and draw the drift of the movie ``cfg``."""
    from simgen import acquisition as acq
    from simgen.dynamics import frame_dose, initial_state, make_lattice, stage_drift, step
    from simgen.pipeline import draw_structure, sample_streams
    from structures import apply_defects, build_monolayer, get_scheme, parse_material

    st = cfg.structure
    n = cfg.dataset.n_samples
    seed = cfg.dataset.seed
    optics = cfg.optics.draw(sample_streams(seed, 0)["optics"])
    p = float(optics["pixel_size_A"])
    h, w = cfg.dataset.image_size
    pad = acq.required_padding_px(cfg.acquisition, (h, w), p)
    window = np.array([(w + 2 * pad) * p, (h + 2 * pad) * p])
    r_drift, r_draw, r_build, r_defects, r_regions = movie_streams(seed, 0).spawn(5)
    drift = stage_drift(n, cfg.stage_drift, r_drift)
    lo, hi = drift.min(axis=0), drift.max(axis=0)
    union = window + (hi - lo)
    drawn = draw_structure(cfg, r_draw)
    material = st.material.args[int(drawn.get("material_index", 0))]
    alloy = st.metals is not None and st.chalcogens is not None
    pristine = build_monolayer(
        None if alloy else material,
        fov=tuple(union),
        metals=st.metals,
        chalcogens=st.chalcogens,
        rotation_deg=drawn["rotation_deg"],
        margin=st.margin_A,
        displacement_sigma=drawn["displacement_sigma_A"],
        rng=r_build,
    )
    spec = {k: drawn[f"defect_{k}"] for k in st.defects}
    defected = (
        apply_defects(
            pristine, spec, by=st.defects_by, substituent=st.substituent, dopant=st.dopant,
            rng=r_defects,
        )
        if spec
        else pristine
    )  # fmt: skip
    host_metals = tuple(st.metals) if st.metals else (parse_material(material)[0],)
    lattice = make_lattice(pristine, pristine.in_fov, cfg.dynamics, r_regions, host_metals)
    dose = frame_dose(cfg.dynamics, cfg.acquisition, p)
    states = [initial_state(pristine, defected)]
    events = []
    from simgen.dynamics import site_slots

    slots = site_slots(lattice)
    for f in range(1, n):
        state, evs = step(
            states[-1], lattice, cfg.dynamics, dose_e_per_A2=dose,
            energy_kV=float(optics["energy_kV"]), rng=movie_streams(seed, f), slots=slots,
        )  # fmt: skip
        states.append(state)
        events.extend((f, kind, a, b) for kind, a, b in evs)
    origins = np.asarray(pristine.fov_origin) + hi - drift
    return MoviePlan(
        pristine=pristine,
        lattice=lattice,
        states=states,
        events=events,
        drift_A=drift,
        origins=origins,
        optics=optics,
        drawn=drawn,
        dose_e_per_A2=dose,
        scheme=get_scheme(cfg.labels.scheme),
    )


def _frame_monolayer(plan: MoviePlan, frame: int):
    """The monolayer of ``frame``: present atoms, defect kinds from the occupancy."""
    ml = plan.pristine
    state = plan.states[frame]
    atoms = ml.atoms.copy()
    atoms.set_chemical_symbols(list(state.symbol))
    atoms = atoms[state.present]
    counts = state.site_counts(plan.lattice)
    full = np.bincount(plan.lattice.atom_site, minlength=len(counts))
    chalc = plan.lattice.sublattice == 1
    defect = np.full(len(counts), "none", dtype=object)
    defect[chalc & (counts == full - 1)] = "vac_X1"
    defect[chalc & (counts <= full - 2)] = "vac_X2"
    defect[~chalc & (counts == 0)] = "vac_M"
    site = plan.lattice.atom_site
    foreign = state.present & (state.symbol != plan.lattice.host_symbol)
    metal_foreign = np.unique(site[foreign & ~chalc[site]])
    defect[metal_foreign] = "dopant_M"
    chalc_foreign = np.unique(site[foreign & chalc[site]])
    chalc_foreign = chalc_foreign[defect[chalc_foreign] == "none"]
    n_foreign = np.bincount(site[foreign], minlength=len(counts))
    defect[chalc_foreign] = np.where(n_foreign[chalc_foreign] >= 2, "sub_X2", "sub_X1")
    sites = ml.sites.with_defects(defect, ml.sites.complex_id)
    return dataclasses.replace(ml, atoms=atoms, sites=sites)


def make_frame(cfg: MovieConfig, frame: int, *, calibration: dict | None = None, plan=None):
    """Frame ``frame`` of the movie as a :class:`simgen.pipeline.Sample` (its columns carry
    ``site_index``, the lattice site of each column)."""
    from simgen.pipeline import render_sample, sample_streams
    from structures import column_table

    plan = plan or cached_plan(cfg)
    if not 0 <= frame < len(plan.states):
        raise ValueError(f"frame {frame} out of range (0..{len(plan.states) - 1})")
    ml = _frame_monolayer(plan, frame)
    table = column_table(ml, plan.scheme)
    params = {
        **plan.drawn,
        "stage_dx_A": float(plan.drift_A[frame, 0]),
        "stage_dy_A": float(plan.drift_A[frame, 1]),
        "dose_e_per_A2": plan.dose_e_per_A2,
    }
    streams = sample_streams(cfg.dataset.seed, frame)
    return render_sample(
        cfg, ml.atoms, table, tuple(plan.origins[frame]), plan.optics, streams,
        calibration=calibration, params=params,
    )  # fmt: skip


@lru_cache(maxsize=2)
def _plan_by_text(text: str) -> MoviePlan:
    import json

    return plan_movie(MovieConfig.from_dict(json.loads(text)))


def cached_plan(cfg: MovieConfig) -> MoviePlan:
    """:func:`plan_movie`, computed once per process and config."""
    import json

    return _plan_by_text(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


def event_table(plan: MoviePlan) -> dict[str, np.ndarray]:
    """The plan's events as arrays (frame, kind code, from_site, to_site)."""
    ev = plan.events
    return {
        "frame": np.array([e[0] for e in ev], dtype=np.int32),
        "kind": np.array([EVENT_KINDS.index(e[1]) for e in ev], dtype=np.int8),
        "from_site": np.array([e[2] for e in ev], dtype=np.int32),
        "to_site": np.array([e[3] for e in ev], dtype=np.int32),
    }


# -- the store -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MovieReport:
    path: str
    n_frames: int
    computed: int
    skipped: int
    n_events: int
    seconds: float


def movie_layout(cfg: MovieConfig):
    from simgen.pipeline import store_layout

    layout = store_layout(cfg)
    names = tuple(sorted(set(layout.param_names) | set(MOVIE_PARAMS)))
    # frames are written one by one (read-modify-write of shared chunks): one per chunk
    return dataclasses.replace(layout, param_names=names, samples_per_task=None)


def is_movie_store(root) -> bool:
    """True when the store was written by :func:`generate_movie` (and finished creating)."""
    return bool((root.attrs.get("movie") or {}).get("tables_written"))


def _create(cfg, out, calibration, plan, replace):
    from simgen.pipeline import store_attrs

    attrs = store_attrs(cfg, calibration)
    root = store.create_store(out, movie_layout(cfg), attrs, overwrite=replace)
    store.create_slot_array(
        root, "site_index", "int32", -1, {"long_name": "lattice site of the column (sites/)"}
    )
    lat = plan.lattice
    store.write_table(root, "sites/x_A", lat.x, dims=("site",), attrs={"units": "Å"})
    store.write_table(root, "sites/y_A", lat.y, dims=("site",), attrs={"units": "Å"})
    store.write_table(root, "sites/sublattice", lat.sublattice, dims=("site",))
    for name, values in event_table(plan).items():
        store.write_table(root, f"events/{name}", values, dims=("event",))
    root.attrs["movie"] = {
        "n_frames": cfg.dataset.n_samples,
        "n_events": len(plan.events),
        "event_kinds": list(EVENT_KINDS),
        "lattice_constant_A": float(plan.pristine.lattice_constant),
        "tables_written": True,
    }
    return root


def generate_movie(
    cfg: MovieConfig,
    out: str | Path,
    *,
    calibration: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> MovieReport:
    """Write (or continue) the movie ``cfg`` into the store ``out``, frame by frame.

    Parameters
    ----------
    cfg : MovieConfig
    out : path
        Store directory (``*.zarr``).
    calibration : dict, optional
        Incoherent-model calibration.
    overwrite : bool
        Replace an existing store (only one simgen made).
    stop_after : int, optional
        Stop after this many frames (tests of interruption).
    """
    from simgen.backend import resolve_device

    resolve_device(cfg.simulation.device)
    out = Path(out)
    plan = cached_plan(cfg)
    with store.WriterLock(out):
        root = None
        if out.exists() and not overwrite and not store.creation_unfinished(out):
            root = store.open_for_resume(
                out,
                cfg.to_dict(),
                movie_layout(cfg),
                normalize=lambda d: type(cfg).from_dict(d).to_dict(),
            )
            if not is_movie_store(root):
                root = None  # killed before its tables were written: holds no frame
        if root is None:
            replace = out.exists() or out.is_symlink()
            root = _create(cfg, out, calibration, plan, replace)
        pending = [int(i) for i in store.pending_indices(root)]
        if stop_after is not None:
            pending = pending[:stop_after]
        skipped = cfg.dataset.n_samples - len(store.pending_indices(root))
        t0 = time.perf_counter()
        bar = None
        if progress and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), unit="frame", desc="movie")
        try:
            for f in pending:
                sample = make_frame(cfg, f, calibration=calibration, plan=plan)
                store.write_slot_values(root, "site_index", f, sample.columns["site_index"], -1)
                store.write_samples(root, [f], [sample])
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return MovieReport(
        str(out), cfg.dataset.n_samples, len(pending), skipped, len(plan.events),
        time.perf_counter() - t0,
    )  # fmt: skip


def read_movie_truth(root) -> dict:
    """Ground truth of a movie store: sites, events (kind names), drift per frame [Å] and
    per-frame columns with their ``site_index``."""
    if not is_movie_store(root):
        raise store.StoreError("not a movie store (no movie tables; made by simgen movie?)")
    kinds = list(root.attrs["movie"]["event_kinds"])
    ev = {k: np.asarray(root[f"events/{k}"][:]) for k in ("frame", "kind", "from_site", "to_site")}
    ev["kind_name"] = np.array([kinds[int(k)] for k in ev["kind"]], dtype=object)
    n = int(root.attrs["n_samples"])
    frames = []
    for f in range(n):
        cols = store.read_columns(root, f)
        cols["site_index"] = store.read_slot_values(root, "site_index", f)
        frames.append(cols)
    return {
        "sites": {
            "x_A": np.asarray(root["sites/x_A"][:]),
            "y_A": np.asarray(root["sites/y_A"][:]),
            "sublattice": np.asarray(root["sites/sublattice"][:]),
        },
        "events": ev,
        "drift_A": np.column_stack(
            [np.asarray(root["params/stage_dx_A"][:]), np.asarray(root["params/stage_dy_A"][:])]
        ),
        "frames": frames,
        "pixel_size_A": root.attrs.get("pixel_size_A"),
    }


def clear_plan_cache() -> None:
    """Forget the plans :func:`cached_plan` computed (as a fresh process would)."""
    _plan_by_text.cache_clear()
