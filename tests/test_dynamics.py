"""Image-stack dynamics: the event process, movie stores, and the analysis that must recover
what the movie did (identity of sites, events, unstable sites)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from simgen import store
from simgen.dynamics import DynamicsConfig, StageDriftConfig, make_lattice, stage_drift, step

runner = CliRunner()

#: A small, busy movie: 160² frames, a dose high enough for a few events per frame.
MOVIE = {
    "dataset.n_samples": 8,
    "dataset.image_size": [160, 160],
    "dataset.seed": 5,
    "simulation.model": "incoherent",
    "simulation.device": "cpu",
    "structure.rotation_deg": 7.0,
    "structure.defects": {"vac_X1": 0.02, "dopant_M": 0.02},
    "optics.C10_A": 0.0,
    "dynamics.dose_per_frame_e_per_A2": 2e6,
    "dynamics.hop_probability": 0.15,
    "dynamics.dopant_hop_probability": 0.3,
    "stage_drift.speed_A_per_frame": 1.0,
    "stage_drift.max_step_A": 2.0,
}


def _monolayer(fov=40.0):
    from structures import build_monolayer

    return build_monolayer("MoS2", fov=(fov, fov), margin=4.0, rng=0)


def test_sputtering_rate_follows_dose_and_cross_section():
    """The number of atoms sputtered in one frame is N (1 - exp(-σ D)) on average."""
    from simgen.dynamics import initial_state

    ml = _monolayer(60.0)
    cfg = DynamicsConfig(mode="random", hop_probability=0.0, fill_probability=0.0,
                         cross_section_barn={"S": 2.0})  # fmt: skip
    lattice = make_lattice(ml, ml.in_fov, cfg, 0, ("Mo",))
    state = initial_state(ml, ml)
    n_s = int(np.sum(state.present & (lattice.host_symbol == "S") & ml.in_fov[lattice.atom_site]))
    for dose in (2e5, 8e5):
        hits = [len(step(state, lattice, cfg, dose_e_per_A2=dose, energy_kV=80, rng=k)[1])
                for k in range(20)]  # fmt: skip
        expected = n_s * (1 - np.exp(-2.0e-8 * dose))
        assert abs(np.mean(hits) - expected) < 4 * np.sqrt(expected / 20) + 0.5
    # metal atoms (no cross-section listed) are never sputtered
    _, events = step(state, lattice, cfg, dose_e_per_A2=1e7, energy_kV=80, rng=1)
    assert all(kind == "vacancy_appears" for kind, _, _ in events)


def test_hops_conserve_atoms_and_are_deterministic():
    from simgen.dynamics import initial_state
    from structures import apply_defects

    ml = _monolayer()
    defected = apply_defects(ml, {"vac_X2": 0.1, "dopant_M": 0.1}, rng=1)
    cfg = DynamicsConfig(mode="random", cross_section_barn={}, hop_probability=1.0,
                         fill_probability=0.0, dopant_hop_probability=1.0)  # fmt: skip
    lattice = make_lattice(ml, ml.in_fov, cfg, 0, ("Mo",))
    state = initial_state(ml, defected)
    new, events = step(state, lattice, cfg, dose_e_per_A2=0.0, energy_kV=80, rng=3)
    again, events2 = step(state, lattice, cfg, dose_e_per_A2=0.0, energy_kV=80, rng=3)
    assert events == events2 and np.array_equal(new.present, again.present)
    kinds = {k for k, _, _ in events}
    assert kinds == {"vacancy_hop", "dopant_hop"}
    assert new.present.sum() == state.present.sum()  # hops move atoms, never remove them
    assert sorted(new.symbol[new.present]) == sorted(state.symbol[state.present])
    counts0, counts1 = state.site_counts(lattice), new.site_counts(lattice)
    a = ml.lattice_constant
    for kind, src, dst in events:
        d = np.hypot(lattice.x[src] - lattice.x[dst], lattice.y[src] - lattice.y[dst])
        assert d == pytest.approx(a, rel=0.1)  # to a neighbouring site of the sublattice
        if kind == "vacancy_hop":  # the vacancy moved from src (filled) to dst (emptied)
            assert counts1[src] == counts0[src] + 1 and counts1[dst] == counts0[dst] - 1
    # each site takes part in at most one event per frame
    touched = [s for _, a_, b in events for s in {a_, b}]
    assert len(touched) == len(set(touched))


def test_stage_drift_is_bounded_and_reproducible():
    cfg = StageDriftConfig(speed_A_per_frame=1.8, random_walk_A=0.5, max_step_A=2.0)
    d = stage_drift(50, cfg, 7)
    assert np.array_equal(d, stage_drift(50, cfg, 7))
    assert np.all(d[0] == 0)
    assert np.linalg.norm(np.diff(d, axis=0), axis=1).max() <= 2.0 + 1e-9
    assert np.linalg.norm(d[-1]) > 30  # the linear part accumulates


def test_clustered_mode_concentrates_creation_events():
    """The movie's own event table: created vacancies cluster in clustered mode only."""
    from simgen.movie import load_movie_config, plan_movie
    from training.dynamics.spatial import clustering

    ratios = {}
    for mode in ("clustered", "random"):
        cfg = load_movie_config().with_overrides({
            "dataset.n_samples": 20, "dataset.image_size": [400, 400], "dynamics.mode": mode,
            "dynamics.dose_per_frame_e_per_A2": 4e5, "structure.rotation_deg": 0.0,
        })  # fmt: skip
        plan = plan_movie(cfg)
        lat = plan.lattice
        created = sorted({a for _, k, a, _ in plan.events if k == "vacancy_appears"})
        xy = np.column_stack([lat.x, lat.y])
        chalc = (lat.sublattice == 1) & lat.active
        ratios[mode] = clustering(xy[created], xy[chalc], rng=0)
    assert ratios["clustered"]["clustered"] and not ratios["random"]["clustered"]
    assert ratios["clustered"]["ripley_excess"] > 3 * max(ratios["random"]["ripley_excess"], 1)
    assert ratios["clustered"]["clark_evans_R"] < ratios["random"]["clark_evans_R"]
    assert 0.85 < ratios["random"]["clark_evans_R"] < 1.15


@pytest.fixture(scope="module")
def movie_cache(tmp_path_factory):
    """Calibration cache of the test movie (PRISM once, ~10 s)."""
    from simgen.api import cached_calibration
    from simgen.movie import load_movie_config
    from simgen.pipeline import calibration_request

    path = tmp_path_factory.mktemp("dyncache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMGEN_CACHE", str(path))
        cfg = load_movie_config().with_overrides(MOVIE)
        key, compute = calibration_request(cfg)
        store.save_calibration(key, cached_calibration(key, compute))  # shipped or computed
        yield path


@pytest.fixture(scope="module")
def movie_store(movie_cache, tmp_path_factory):
    from simgen.api import calibration_for
    from simgen.movie import generate_movie, load_movie_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMGEN_CACHE", str(movie_cache))
        cfg = load_movie_config().with_overrides(MOVIE)
        out = tmp_path_factory.mktemp("movie") / "m.zarr"
        generate_movie(cfg, out, calibration=calibration_for(cfg), progress=False)
        yield cfg, out


def test_frame_depends_only_on_seed_and_frame_and_resume_is_bit_identical(
    movie_store, movie_cache, tmp_path, monkeypatch
):
    from simgen.api import calibration_for
    from simgen.generation import stores_identical
    from simgen.movie import clear_plan_cache, generate_movie, make_frame, read_movie_truth

    monkeypatch.setenv("SIMGEN_CACHE", str(movie_cache))
    cfg, full = movie_store
    cal = calibration_for(cfg)
    a = make_frame(cfg, 5, calibration=cal)
    clear_plan_cache()  # a fresh process: the plan is recomputed
    make_frame(cfg, 2, calibration=cal)
    b = make_frame(cfg, 5, calibration=cal)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    other = make_frame(cfg.with_overrides({"dataset.seed": 6}), 5, calibration=cal)
    assert not np.array_equal(a.image, other.image)
    part = tmp_path / "part.zarr"
    generate_movie(cfg, part, calibration=cal, progress=False, stop_after=3)
    assert int(store.complete_flags(store.open_store(part)).sum()) == 3
    report = generate_movie(cfg, part, calibration=cal, progress=False)
    assert (report.computed, report.skipped) == (5, 3)
    assert stores_identical(full, part)
    truth = read_movie_truth(store.open_store(full))
    assert len(truth["events"]["frame"]) > 5
    assert truth["events"]["frame"].min() >= 1  # an event happens between two frames
    # the labels follow the events: a vacancy_appears site has one atom fewer afterwards
    ev = truth["events"]
    k = int(np.flatnonzero(ev["kind_name"] == "vacancy_appears")[0])
    f, s = int(ev["frame"][k]), int(ev["from_site"][k])
    n = []
    for frame in (f - 1, f):
        cols = truth["frames"][frame]
        hit = np.flatnonzero(cols["site_index"] == s)
        n.append(int(cols["n_atoms"][hit[0]]) if len(hit) else None)
    if None not in n:
        assert n[1] == n[0] - 1


def test_drift_path_follows_the_evidence_of_the_whole_stack_not_one_pair():
    """Lattice aliases of every step are candidates; a fast drift (more than half a lattice
    vector per frame: nearer an alias than "no drift") and one pair whose strongest
    evidence is a hopping dopant's alias still give the true path, and a path off by a
    lattice vector in every frame (as smooth as the truth) is not taken."""
    from training.dynamics.tracking import drift_path

    rng = np.random.default_rng(0)
    a_len = 15.8
    a1, a2 = np.array([a_len, 0.0]), a_len * np.array([0.5, np.sqrt(3) / 2])
    n = np.arange(-2, 3)
    shifts = np.array([i * a1 + j * a2 for i in n for j in n])
    shifts = shifts[np.linalg.norm(shifts, axis=1) <= 2 * a_len]
    zero = int(np.argmin(np.linalg.norm(shifts, axis=1)))
    truth = np.array([10.0, 2.0]) + rng.normal(0, 1.0, (30, 2))  # 2 Å/frame at 0.2 Å/px
    candidates = []
    for f, true_step in enumerate(truth):
        z = rng.normal(0, 1, len(shifts))
        z[zero] += 2.5  # weak evidence for the truth in each pair
        if f == 7:
            z[zero - 1] = 15.0  # a hopping dopant: strong evidence for an alias in one pair
        candidates.append((true_step + shifts, z))
    path = drift_path(candidates, a_len)
    np.testing.assert_allclose(path, truth)
    assert np.linalg.norm(truth[0]) > 0.5 * a_len  # the first step: an alias is nearer 0
    # without the evidence every smooth path is as good: the truth wins only by evidence
    flat = [(c[0], np.where(np.arange(len(shifts)) == zero - 1, 1.0, 0.0)) for c in candidates]
    assert not np.allclose(drift_path(flat, a_len), truth)


def _lattice_frame(shift_px, size=160, px=0.2, a=3.16):
    """A defect-free 2H projection: Gaussian metal (1.0) and chalcogen (0.6) columns."""
    b = a / np.sqrt(3)
    a1, a2 = np.array([a, 0.0]), np.array([a / 2, a * np.sqrt(3) / 2])
    n = np.arange(-20, 21)
    base = (n[:, None, None] * a1 + n[None, :, None] * a2).reshape(-1, 2) / px
    yy, xx = np.mgrid[:size, :size].astype(float)
    img = np.zeros((size, size))
    for offset, weight in ((np.zeros(2), 1.0), (np.array([0.0, b]) / px, 0.6)):
        for x, y in base + offset + np.asarray(shift_px):
            if -5 < x < size + 5 and -5 < y < size + 5:
                img += weight * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.75**2))
    return img


def test_a_defect_free_pair_of_frames_keeps_the_registered_step():
    """No aperiodic feature: every lattice translation has the same (no) evidence; the
    registration's own step is kept, not a lattice vector added to it."""
    from training.dynamics.tracking import track_stack

    rng = np.random.default_rng(1)
    clean = [_lattice_frame((0.0, 0.0)), _lattice_frame((3.0, -2.0))]
    frames = np.stack([rng.poisson(20.0 * f + 1.0) / 20.0 for f in clean])  # λ 20 per column
    tracks = track_stack(frames, 3.16 / np.sqrt(3) / 0.2)
    np.testing.assert_allclose(tracks.registration.rigid_px[1], [3.0, -2.0], atol=0.3)


def test_observable_scoring_pairs_the_true_changes_as_the_analysis_does():
    """A vacancy created next to a site refilled in the same frame is a hop in the images:
    scored as one by default, and as the simulator's two events with observable=False."""
    from types import SimpleNamespace

    from simgen.dynamics import EVENT_KINDS
    from structures import CHALCOGEN
    from training.dynamics.events import pair_hops, sublattice_neighbours
    from training.dynamics.truth import score_events

    a = 10.0
    n = np.arange(-4, 5)
    xy = np.array([[i * a + j * a / 2, j * a * np.sqrt(3) / 2] for i in n for j in n]) + 100
    t = 3
    tracks = SimpleNamespace(
        sites_xy=xy, sublattice=np.full(len(xy), CHALCOGEN, np.int8),
        lattice_vectors_px=np.array([[a, 0.0], [a / 2, a * np.sqrt(3) / 2]]),
        in_view=np.ones((t, len(xy)), bool),
    )  # fmt: skip
    centre = int(np.argmin(np.linalg.norm(xy - xy.mean(axis=0), axis=1)))
    near = sublattice_neighbours(tracks, centre)
    assert len(near) == 6
    far = int(np.argmax(np.linalg.norm(xy - xy[centre], axis=1) < 0))  # any other site
    assert pair_hops([centre], [near[0]], lambda s: sublattice_neighbours(tracks, s)) == [
        (centre, near[0])
    ]
    assert pair_hops([centre], [far], lambda s: sublattice_neighbours(tracks, s)) == []
    truth = {
        "events": {
            "frame": np.array([1, 1]),
            "kind_name": np.array(["vacancy_appears", "vacancy_disappears"]),
            "from_site": np.array([centre, near[0]]),
            "to_site": np.array([centre, near[0]]),
        }
    }
    mapping = {i: i for i in range(len(xy))}
    hop = [{"frame": 1, "kind": "vacancy_hop", "from_site": near[0], "to_site": centre}]
    seen = score_events(hop, truth, mapping, tracks, EVENT_KINDS)
    assert seen["vacancy_hop"]["precision"] == 1.0 and seen["vacancy_hop"]["recall"] == 1.0
    assert seen["vacancy_appears"]["true"] == 0
    raw = score_events(hop, truth, mapping, tracks, EVENT_KINDS, observable=False)
    assert raw["vacancy_hop"]["precision"] == 0.0 and raw["vacancy_appears"]["true"] == 1


def test_analysis_recovers_sites_and_events(movie_store):
    import torch

    from simgen.dynamics import EVENT_KINDS
    from simgen.movie import read_movie_truth
    from training.dynamics import DynamicsSettings, analyse_stack, read_stack
    from training.dynamics.truth import auroc, event_sites, map_sites, score_events

    torch.set_num_threads(1)
    _, path = movie_store
    st = read_stack(path)
    truth = read_movie_truth(st.store)
    res = analyse_stack(st.frames, st.pixel_size_A, DynamicsSettings(ae_steps=60))
    mapped = map_sites(res.tracks, truth)
    assert mapped["identity"] >= 0.95
    scores = score_events(res.events, truth, mapped["true_to_track"], res.tracks, EVENT_KINDS)
    appear, dopant = scores["vacancy_appears"], scores["dopant_hop"]
    assert appear["true"] >= 8 and dopant["true"] >= 5
    assert appear["recall"] >= 0.7 and appear["precision"] >= 0.75
    assert dopant["recall"] >= 0.8 and dopant["precision"] >= 0.8
    pos = np.zeros(len(res.tracks.sites_xy), bool)
    pos[list(event_sites(truth, mapped["true_to_track"]))] = True
    seen = np.zeros_like(pos)
    seen[list(mapped["true_to_track"].values())] = True
    assert auroc(res.instability["score"][seen], pos[seen]) > 0.8
    # drift recovered: the registration's rigid part follows the true stage drift
    true_px = truth["drift_A"] / st.pixel_size_A
    err = np.linalg.norm(res.tracks.registration.rigid_px - true_px, axis=1)
    assert err.max() < 2.0


def test_cli_writes_all_outputs_and_refuses_bad_stacks(movie_store, tmp_path):
    from training.cli import app

    _, path = movie_store
    out = tmp_path / "dyn"
    r = runner.invoke(app, ["dynamics", str(path), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    for name in ("tracks.csv", "events.csv", "sites.csv", "instability_map.png", "latent.png",
                 "stack.gif", "summary.json", ".simgen-dynamics.json"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_frames"] == 8 and summary["events"]["vacancy_appears"] > 0

    frames = np.asarray(store.open_store(path)["images"][:])
    rng = np.random.default_rng(0)
    cases = {}
    np.save(tmp_path / "one.npy", frames[0])
    cases["single image"] = (tmp_path / "one.npy", "single image")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", frames[0])
    np.save(mixed / "b.npy", frames[1][:96, :96])
    cases["sizes"] = (mixed, "different sizes")
    np.save(tmp_path / "noise.npy", rng.normal(10, 3, (4, 128, 128)).astype(np.float32))
    cases["no lattice"] = (tmp_path / "noise.npy", "no 2H lattice")
    jumbled = frames[:4].copy()
    jumbled[2] = rng.normal(jumbled.mean(), jumbled.std(), jumbled[2].shape)
    np.save(tmp_path / "jumbled.npy", jumbled)
    cases["unregistrable"] = (tmp_path / "jumbled.npy", "cannot be registered")
    for what, (src, phrase) in cases.items():
        target = tmp_path / f"out_{what.replace(' ', '_')}"
        r = runner.invoke(
            app, ["dynamics", str(src), "-o", str(target), "--pixel-size", "0.2", "-q"]
        )
        assert r.exit_code == 1, (what, r.output)
        lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and phrase in lines[0], (what, r.output)
        assert not target.exists(), what
