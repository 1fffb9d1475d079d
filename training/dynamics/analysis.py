"""The whole dynamics analysis of a stack and the files a microscopist looks at.

:func:`analyse_stack` (no disk access): tracking (:mod:`~training.dynamics.tracking`),
intensity states and events (:mod:`~training.dynamics.events`), the autoencoder
(:mod:`~training.dynamics.autoencoder`), instability, density and clustering
(:mod:`~training.dynamics.spatial`). :func:`write_outputs` writes ``tracks.csv``,
``events.csv``, ``sites.csv``, ``instability_map.png``, ``latent.png``, ``stack.gif`` and
``summary.json`` into a temporary folder that is renamed to the output folder at the end,
with the ownership marker ``.simgen-dynamics.json``: an interrupted run leaves nothing that
looks complete, and only a folder this command made is ever replaced.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simgen.dynamics import EVENT_KINDS
from structures import CHALCOGEN, METAL
from training.dynamics.events import classify_sites, detect_events, site_intensities
from training.dynamics.tracking import StackError, Tracks, track_stack

MARKER = ".simgen-dynamics.json"
SUBLATTICE_NAMES = {METAL: "metal", CHALCOGEN: "chalcogen", -1: "unassigned"}


@dataclass(frozen=True)
class DynamicsSettings:
    """How a stack is analysed.

    Attributes
    ----------
    lattice_constant_A : float
        Expected lattice constant a [Å] (sets the column spacing b = a/√3 searched for).
    latent_dim, ae_steps : int
        Autoencoder latent size and training steps.
    window : int
        Frames averaged on each side of a step in the instability score.
    unstable_z : float
        Instability (robust z) above which a site counts as unstable (besides sites with
        a detected event).
    bandwidth_A : float
        Kernel bandwidth of the density map [Å].
    switch : float
        Probability per frame that a site changes state (the Viterbi prior).
    seed : int
        Seed of the autoencoder and the CSR draws.
    """

    lattice_constant_A: float = 3.16
    latent_dim: int = 8
    ae_steps: int = 300
    window: int = 3
    unstable_z: float = 8.0
    bandwidth_A: float = 10.0
    switch: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if not 2.0 <= self.lattice_constant_A <= 5.0:
            raise ValueError(f"lattice_constant_A: expected 2..5 Å, got {self.lattice_constant_A}")


@dataclass(frozen=True)
class DynamicsResult:
    """Everything :func:`analyse_stack` found (see the module docstring)."""

    frames: np.ndarray = field(repr=False)
    pixel_size_A: float
    tracks: Tracks
    intensity: np.ndarray
    states: object
    events: list
    latent: np.ndarray = field(repr=False)
    instability: dict
    unstable: np.ndarray
    clustering: dict
    density_nm2: np.ndarray = field(repr=False)
    model_class: np.ndarray | None
    summary: dict


def _model_columns(frames, pixel_size_A, model, material, bar):
    """Columns and their classes from a trained network, frame by frame."""
    from simgen.experiment.readers import ExperimentImage
    from training.experiments.label import label_image
    from training.predict import Ensemble

    ensemble = Ensemble.load(model, "cpu")
    cols, classes, names = [], [], None
    for f, data in enumerate(frames):
        img = ExperimentImage(data, float(pixel_size_A), "user", None, "stack", f)
        res = label_image(img, ensemble, material=material, tta=False)
        cat = res.catalogue
        det = cat.detected
        cols.append(np.column_stack([cat.x_px[det], cat.y_px[det]]))
        classes.append(cat.class_id[det])
        names = cat.class_names
        bar(f"columns (model) {f + 1}/{len(frames)}")
    return cols, classes, names


def analyse_stack(
    frames,
    pixel_size_A: float,
    settings: DynamicsSettings | None = None,
    *,
    model=None,
    material: str | None = None,
    progress: bool = False,
) -> DynamicsResult:
    """Track, classify, find events and unstable sites in a stack.

    Parameters
    ----------
    frames : ndarray, shape (T, H, W)
    pixel_size_A : float
        [Å/px]
    settings : DynamicsSettings, optional
    model : path-like, optional
        A trained run/checkpoint/ensemble: its columns replace peak finding.
    material : str, optional
        E.g. ``"MoS2"``: its lattice constant replaces ``settings.lattice_constant_A``.
    progress : bool
        A progress bar over the frames of each stage.

    Raises
    ------
    StackError
        No lattice, a frame that cannot be registered.
    """
    from training.dynamics.autoencoder import stack_latents
    from training.dynamics.spatial import clustering, density_map, instability

    settings = settings or DynamicsSettings()
    t0 = time.perf_counter()
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or len(frames) < 2:
        raise StackError(f"expected a stack (T >= 2, H, W), got shape {frames.shape}")
    a_A = settings.lattice_constant_A
    if material:
        from simgen.experiment.calibration import lattice_constant_of

        a_A = float(lattice_constant_of(material))
    bond_px = a_A / math.sqrt(3) / pixel_size_A
    t_count = len(frames)
    bar = _Bar(progress, 4 * t_count)
    columns = model_class_frames = class_names = None
    if model is not None:
        columns, model_class_frames, class_names = _model_columns(
            frames, pixel_size_A, model, material, bar.say
        )
    clock = {"start": time.perf_counter()}
    tracks = track_stack(frames, bond_px, columns=columns, progress=lambda f: bar.tick("register"))
    bar.tick("register")
    clock["tracking"] = time.perf_counter()
    intensity = site_intensities(frames, tracks, progress=lambda f: bar.tick("intensities"))
    states = classify_sites(intensity, tracks.sublattice, switch=settings.switch)
    events = detect_events(states, tracks)
    clock["states_events"] = time.perf_counter()
    scales = _frame_scales(frames, tracks)
    latent, losses = stack_latents(
        frames, tracks, scales, latent_dim=settings.latent_dim, steps=settings.ae_steps,
        rng=settings.seed, progress=lambda f: bar.tick("autoencoder"),
    )  # fmt: skip
    clock["autoencoder"] = time.perf_counter()
    sigma = {
        METAL: states.levels.get("metal").sigma if "metal" in states.levels else 1.0,
        CHALCOGEN: states.levels.get("chalcogen").sigma if "chalcogen" in states.levels else 1.0,
    }
    inst = {"score": np.zeros(len(tracks.sites_xy))}
    parts = {k: np.zeros(len(tracks.sites_xy)) for k in ("intensity_step", "latent_step")}
    for sub in (METAL, CHALCOGEN):
        sel = tracks.sublattice == sub
        if sel.sum() < 3:
            continue
        got = instability(intensity[:, sel], latent[:, sel], sigma[sub], window=settings.window)
        inst["score"][sel] = got["score"]
        for k in parts:
            parts[k][sel] = got[k]
    inst.update(parts)
    n_events = np.zeros(len(tracks.sites_xy), dtype=np.int64)
    for e in events:
        n_events[e["from_site"]] += 1
        if e["to_site"] != e["from_site"]:
            n_events[e["to_site"]] += 1
    inst["n_events"] = n_events
    unstable = (n_events > 0) | (inst["score"] >= settings.unstable_z)
    analysed = tracks.in_view.mean(axis=0) >= 0.5
    unstable &= analysed
    xy_A = tracks.sites_xy * pixel_size_A
    # the clustering test: sites where the beam created a vacancy (one independent draw each
    # under CSR; a hopping vacancy's later sites are not independent), against the analysed
    # chalcogen sites, the only ones where a vacancy can appear
    created = np.zeros(len(tracks.sites_xy), bool)
    created[[e["from_site"] for e in events if e["kind"] == "vacancy_appears"]] = True
    chalcogen = analysed & (tracks.sublattice == CHALCOGEN)
    clus = clustering(xy_A[created & chalcogen], xy_A[chalcogen], rng=settings.seed)
    window = np.zeros(frames.shape[1:], bool)
    r = np.clip(np.rint(tracks.sites_xy[analysed, 1]).astype(int), 0, window.shape[0] - 1)
    c = np.clip(np.rint(tracks.sites_xy[analysed, 0]).astype(int), 0, window.shape[1] - 1)
    window[r, c] = True
    from scipy import ndimage

    window = ndimage.binary_closing(window, iterations=int(2 * bond_px) + 1) | window
    window = ndimage.binary_fill_holes(window)
    density = density_map(
        tracks.sites_xy[unstable], frames.shape[1:], pixel_size_A, settings.bandwidth_A, window
    )
    clock["spatial"] = time.perf_counter()
    model_class = None
    if model_class_frames is not None:
        model_class = _site_classes(tracks, columns, model_class_frames)
    reg = tracks.registration
    steps = np.diff(reg.rigid_px, axis=0) * pixel_size_A
    summary = {
        "n_frames": t_count,
        "frame_shape": list(frames.shape[1:]),
        "pixel_size_A": float(pixel_size_A),
        "lattice_constant_A": a_A,
        "columns": "model" if model is not None else "lattice peak finding",
        "model": str(model) if model is not None else None,
        "n_sites": int(len(tracks.sites_xy)),
        "n_sites_analysed": int(analysed.sum()),
        "sites_per_sublattice": {
            SUBLATTICE_NAMES[k]: int(np.sum(tracks.sublattice == k)) for k in (METAL, CHALCOGEN, -1)
        },
        "drift": {
            "total_A": (reg.rigid_px[-1] * pixel_size_A).tolist(),
            "max_step_A": float(np.linalg.norm(steps, axis=1).max()) if len(steps) else 0.0,
            "registration_rms_A": float(reg.rms_px.max() * pixel_size_A),
            "min_matched_fraction": float(reg.matched.min()),
        },
        "levels": {
            k: {"means": v.means.tolist(), "weights": v.weights.tolist(), "sigma": v.sigma}
            for k, v in states.levels.items()
        },
        "events": {
            k: int(sum(e["kind"] == k for e in events)) for k in (*EVENT_KINDS, "metal_change")
        },
        "n_unstable_sites": int(unstable.sum()),
        "unstable_density_nm2": float(
            unstable.sum() / (analysed.sum() * _site_area_A2(a_A) / 100.0)
        ) if analysed.any() else None,
        "clustering": clus,
        "autoencoder": {"latent_dim": settings.latent_dim, "steps": settings.ae_steps,
                        "final_loss": float(losses[-20:].mean())},
        "settings": settings.__dict__,
        "seconds": time.perf_counter() - t0,
        "stage_seconds": _stages(clock),
    }  # fmt: skip
    bar.close()
    return DynamicsResult(
        frames=frames,
        pixel_size_A=float(pixel_size_A),
        tracks=tracks,
        intensity=intensity,
        states=states,
        events=events,
        latent=latent,
        instability=inst,
        unstable=unstable,
        clustering=clus,
        density_nm2=density,
        model_class=model_class,
        summary={**summary, "model_class_names": list(class_names) if class_names else None},
    )


def _stages(clock: dict) -> dict:
    names = list(clock)
    return {b: clock[b] - clock[a] for a, b in zip(names[:-1], names[1:], strict=True)}


def _site_area_A2(a_A: float) -> float:
    """Area per site (two sites per unit cell of a²√3/2) [Å²]."""
    return a_A * a_A * math.sqrt(3) / 4


def _frame_scales(frames, tracks) -> np.ndarray:
    from training.dynamics.tracking import disk_intensities

    out = np.ones(len(frames))
    metal = tracks.sublattice == METAL
    for f in range(len(frames)):
        v = tracks.in_view[f] & metal
        if v.any():
            val = np.median(disk_intensities(frames[f], tracks.xy[f, v], 0.3 * tracks.bond_px))
            out[f] = val if val > 0 else float(np.abs(frames[f]).mean() + 1e-6)
    return out


def _site_classes(tracks, columns, classes) -> np.ndarray:
    """The network's class of each site in each frame (−1 where no column was linked)."""
    from training.dynamics.tracking import match_points

    out = np.full(tracks.observed.shape, -1, dtype=np.int64)
    for f, (cols, cls) in enumerate(zip(columns, classes, strict=True)):
        i, j = match_points(tracks.xy[f], np.asarray(cols, float), 0.4 * tracks.bond_px)
        out[f, i] = np.asarray(cls)[j]
    return out


class _Bar:
    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="frame", desc="dynamics")

    def tick(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"dynamics: {what}", refresh=False)
            self.bar.update(1)

    def say(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"dynamics: {what}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- files ---------------------------------------------------------------------------------
def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _fmt(v, digits=4):
    return (
        ""
        if v is None or (isinstance(v, float) and not math.isfinite(v))
        else round(float(v), digits)
    )


def _tables(result: DynamicsResult, folder: Path) -> None:
    tr = result.tracks
    p = result.pixel_size_A
    t_count, n = tr.observed.shape
    rows = []
    mc = result.model_class
    for f in range(t_count):
        for s in np.flatnonzero(tr.in_view[f]):
            rows.append([
                f, int(s), _fmt(tr.xy[f, s, 0], 3), _fmt(tr.xy[f, s, 1], 3), int(tr.observed[f, s]),
                _fmt(result.intensity[f, s]), result.states.label[f, s],
                "" if mc is None else int(mc[f, s]),
            ])  # fmt: skip
    _write_csv(
        folder / "tracks.csv",
        ["frame", "site", "x_px", "y_px", "observed", "intensity", "state", "model_class"],
        rows,
    )
    ev_rows = []
    for e in result.events:
        a, b = e["from_site"], e["to_site"]
        ev_rows.append([
            e["frame"], e["kind"], a, b, e["from_state"], e["to_state"],
            _fmt(tr.sites_xy[a, 0] * p, 3), _fmt(tr.sites_xy[a, 1] * p, 3),
            _fmt(tr.sites_xy[b, 0] * p, 3), _fmt(tr.sites_xy[b, 1] * p, 3),
        ])  # fmt: skip
    _write_csv(
        folder / "events.csv",
        ["frame", "kind", "from_site", "to_site", "from_state", "to_state",
         "from_x_A", "from_y_A", "to_x_A", "to_y_A"],
        ev_rows,
    )  # fmt: skip
    inst = result.instability
    site_rows = []
    for s in range(n):
        site_rows.append([
            s, SUBLATTICE_NAMES[int(tr.sublattice[s])], _fmt(tr.sites_xy[s, 0], 3),
            _fmt(tr.sites_xy[s, 1], 3), _fmt(tr.sites_xy[s, 0] * p, 3),
            _fmt(tr.sites_xy[s, 1] * p, 3), int(tr.in_view[:, s].sum()),
            int(tr.observed[:, s].sum()), _fmt(inst["score"][s]),
            _fmt(inst["intensity_step"][s]), _fmt(inst["latent_step"][s]),
            int(inst["n_events"][s]),
            int(result.unstable[s]),
        ])  # fmt: skip
    _write_csv(
        folder / "sites.csv",
        ["site", "sublattice", "x_px", "y_px", "x_A", "y_A", "frames_in_view", "frames_observed",
         "instability", "intensity_step_sigma", "latent_step", "n_events", "unstable"],
        site_rows,
    )  # fmt: skip


def _figures(result: DynamicsResult, folder: Path) -> None:
    from matplotlib.figure import Figure

    tr = result.tracks
    mean = result.frames[0]
    lo, hi = np.percentile(mean, [1, 99.5])
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(mean, cmap="gray", vmin=lo, vmax=hi)
    score = result.instability["score"]
    order = np.argsort(score)
    sc = ax1.scatter(tr.sites_xy[order, 0], tr.sites_xy[order, 1], c=np.clip(score[order], -2, 20),
                     s=6, cmap="inferno")  # fmt: skip
    fig.colorbar(sc, ax=ax1, label="instability (robust z)", shrink=0.8)
    ax1.set_title("frame 0 (reference) with the instability of each site", fontsize=9)
    ax1.set_axis_off()
    im = ax2.imshow(result.density_nm2, cmap="magma")
    u = result.unstable
    ax2.scatter(tr.sites_xy[u, 0], tr.sites_xy[u, 1], s=4, c="cyan", label="unstable sites")
    fig.colorbar(im, ax=ax2, label="unstable sites per nm²", shrink=0.8)
    c = result.clustering
    ax2.set_title(
        f"density (KDE, {result.summary['settings']['bandwidth_A']:g} Å); created "
        f"vacancies: Ripley test p = {c.get('p_clustered', float('nan')):.3f}, "
        f"Clark–Evans R = {c.get('clark_evans_R', float('nan')):.2f}",
        fontsize=9,
    )
    ax2.set_axis_off()
    ax2.legend(loc="lower right", fontsize=7)
    fig.savefig(folder / "instability_map.png", dpi=100)

    # latent embedding (PCA of the latent vectors, a sample of (frame, site) pairs)
    lat = result.latent
    ok = np.isfinite(lat).all(axis=2)
    pairs = np.argwhere(ok)
    rng = np.random.default_rng(0)
    pairs = pairs[rng.choice(len(pairs), size=min(6000, len(pairs)), replace=False)]
    z = lat[pairs[:, 0], pairs[:, 1]].astype(np.float64)
    z = z - z.mean(axis=0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    e = z @ vt[:2].T
    labels = result.states.label[pairs[:, 0], pairs[:, 1]].astype(str)
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name in sorted(set(labels)):
        sel = labels == name
        ax1.scatter(e[sel, 0], e[sel, 1], s=3, label=f"{name or 'unknown'} ({sel.sum()})")
    ax1.legend(fontsize=7, markerscale=3)
    ax1.set_title("autoencoder latent space (PCA), by intensity state", fontsize=9)
    sc = ax2.scatter(e[:, 0], e[:, 1], s=3, c=np.clip(score[pairs[:, 1]], -2, 20), cmap="inferno")
    fig.colorbar(sc, ax=ax2, label="site instability")
    ax2.set_title("by the site's instability", fontsize=9)
    fig.savefig(folder / "latent.png", dpi=100)


def _gif(result: DynamicsResult, folder: Path, max_side: int = 256) -> None:
    import imageio.v2 as imageio
    from PIL import Image, ImageDraw

    tr = result.tracks
    t_count, h, w = result.frames.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    colors = {"vacancy_appears": (255, 60, 60), "vacancy_disappears": (60, 220, 60),
              "vacancy_hop": (255, 200, 0), "dopant_hop": (0, 200, 255),
              "metal_vacancy": (255, 0, 255), "metal_change": (160, 160, 255)}  # fmt: skip
    by_frame: dict[int, list] = {}
    for e in result.events:
        by_frame.setdefault(e["frame"], []).append(e)
    images = []
    for f in range(t_count):
        img = result.frames[f]
        lo, hi = np.percentile(img, [1, 99.5])
        g = np.clip((img - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
        pil = Image.fromarray(g).resize(size, Image.BILINEAR).convert("RGB")
        draw = ImageDraw.Draw(pil)
        for dt in (0, 1, 2):  # an event stays marked for three frames
            for e in by_frame.get(f - dt, []):
                for s in {e["from_site"], e["to_site"]}:
                    x, y = tr.xy[f, s] * scale
                    r = 4
                    draw.ellipse([x - r, y - r, x + r, y + r], outline=colors[e["kind"]])
        draw.text((3, 3), f"frame {f}", fill=(255, 255, 0))
        images.append(np.asarray(pil))
    imageio.mimsave(folder / "stack.gif", images, duration=0.2, loop=0)


def check_output(out: Path) -> None:
    """Refuse an output that exists and was not made by this command."""
    out = Path(out)
    if out.is_file() or out.is_symlink():
        raise ValueError(f"{out}: is a file; give a folder for the outputs")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(
            f"{out}: exists and was not made by simgen-train dynamics (no {MARKER}); choose "
            "another output folder"
        )


def write_outputs(result: DynamicsResult, out, *, source: str = "") -> dict[str, Path]:
    """Write every output file into ``out`` (module docstring: all or nothing)."""
    from simgen.store import to_jsonable, write_json

    out = Path(out)
    check_output(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _tables(result, tmp)
        _figures(result, tmp)
        _gif(result, tmp)
        write_json({**result.summary, "source": source}, tmp / "summary.json")
        write_json(to_jsonable({"tool": "simgen-train dynamics", "source": source}), tmp / MARKER)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    names = ("tracks.csv", "events.csv", "sites.csv", "instability_map.png", "latent.png",
             "stack.gif", "summary.json")  # fmt: skip
    return {n: out / n for n in names}
