"""Self-training on the user's unlabelled real images (``simgen-train adapt``).

A network trained on simulations labels the user's images; the sites it labels with
confidence **and** consistently with the lattice become pseudo-labels; the network then
continues training on its simulated stores mixed with those images, and the round repeats.

Per round:

1. :func:`training.experiments.label.label_files` labels every image with the current model
   into ``OUT/labels_round_<r>/`` (``labels_round_0`` is the model given, before any
   adaptation): catalogue, overlays and the quality figures of
   :mod:`simgen.experiment.quality`.
2. :func:`pseudo_labels`: a site keeps its class when it lies on the fitted lattice (a metal
   or chalcogen site, so its class obeys the site constraint) and the network's own
   probability of that class (the ensemble mean over the column, background included,
   before the constraint renormalises over the classes allowed on the site) is at least
   ``min_probability``; the other sites are left unlabelled (:data:`simgen.labels.
   UNLABELLED`: their disks carry no loss). An empty site (a vacancy the labelling confirmed)
   is judged by the vacancy's probability sampled there. Pixels farther than a disk radius
   from every site are background. An image with fewer than ``min_kept`` of its sites
   labelled is left out of the round.
3. The pseudo-labelled images go into ``OUT/round_<r>/human_labels.zarr`` at the network's
   pixel size (:func:`training.finetune.store_for`) and the model continues training on its
   simulated stores plus that store (``real_fraction`` of the draws; the pseudo-labels are
   only trained on, never validated on) into ``OUT/round_<r>/``.

After the last round ``OUT/ensemble.json`` points at the last round's checkpoints, so ``OUT``
is a model like any run folder (``simgen-train label OUT ...``); ``OUT/adapt.json`` holds
the quality figures and class fractions of every image before and after, and the simulated
held-out macro F1 (the run's own validation split of its simulated stores, or its
``val_stores``) before and after, which must not drop by more than ``max_f1_loss`` (0.5 %):
otherwise the report says so and the exit code is 1. A run without a simulated validation
part is refused (nothing would check that adaptation did no harm).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simgen.experiment.lattice import UNASSIGNED
from simgen.labels import UNLABELLED

#: Name of the report written into the output folder.
REPORT = "adapt.json"


@dataclass(frozen=True)
class AdaptSettings:
    """How to self-train.

    Attributes
    ----------
    rounds : int
        Label → pseudo-label → train rounds.
    min_probability : float
        A site keeps its class from this probability of that class on (0.5–1).
    min_kept : float
        An image joins a round only when at least this fraction of its sites is labelled.
    real_fraction : float
        Share of training draws from the pseudo-labelled images (the simulated stores share
        the rest).
    epochs : int
        Epochs of training per round.
    lr_scale : float
        Learning rate of the rounds as a fraction of the run's ``optim.lr`` (a restart at the
        full rate undoes much of what the run learnt before the pseudo-labels can help).
    max_f1_loss : float
        Largest allowed drop of the simulated held-out macro F1 (absolute, 0.005 = 0.5 %).
    """

    rounds: int = 2
    min_probability: float = 0.9
    min_kept: float = 0.5
    real_fraction: float = 0.3
    epochs: int = 4
    lr_scale: float = 0.1
    max_f1_loss: float = 0.005

    def __post_init__(self):
        if not 1 <= self.rounds <= 20:
            raise ValueError(f"--rounds: expected 1..20, got {self.rounds}")
        if not 0.5 <= self.min_probability <= 1.0:
            raise ValueError(f"--min-probability: expected 0.5..1, got {self.min_probability}")
        if not 0.0 <= self.min_kept <= 1.0:
            raise ValueError(f"--min-kept: expected 0..1, got {self.min_kept}")
        if not 0.0 < self.real_fraction < 1.0:
            raise ValueError(f"--real-fraction: expected between 0 and 1, got {self.real_fraction}")
        if self.epochs < 1:
            raise ValueError(f"--epochs: expected >= 1, got {self.epochs}")
        if not 0.0 < self.lr_scale <= 1.0:
            raise ValueError(f"--lr-scale: expected 0 < scale <= 1, got {self.lr_scale}")
        if not 0.0 <= self.max_f1_loss < 1.0:
            raise ValueError(f"max_f1_loss: expected 0..1, got {self.max_f1_loss}")


def pseudo_labels(site, class_id, probability, min_probability: float) -> np.ndarray:
    """Class ids of the pseudo-labels: a site's class where it lies on the lattice and its
    probability reaches ``min_probability``, :data:`~simgen.labels.UNLABELLED` elsewhere.

    Parameters
    ----------
    site : array_like of int, shape (N,)
        Sublattice of each site (``UNASSIGNED`` = −1 off the lattice).
    class_id : array_like of int, shape (N,)
        Class after the site constraint.
    probability : array_like of float, shape (N,)
        The network's probability of that class (NaN when unknown: unlabelled).
    min_probability : float

    Returns
    -------
    ndarray of int64, shape (N,)
    """
    site = np.asarray(site)
    cid = np.asarray(class_id, dtype=np.int64)
    prob = np.asarray(probability, dtype=np.float64)
    if not (site.shape == cid.shape == prob.shape):
        raise ValueError("site, class_id and probability: expected one value per site each")
    sure = (site != UNASSIGNED) & np.isfinite(prob) & (prob >= min_probability)
    return np.where(sure, cid, UNLABELLED)


@dataclass
class PseudoImage:
    """Pseudo-labels of one labelled image (``sample`` None: left out of the round)."""

    name: str
    sites: int
    kept: int
    sample: object | None = field(default=None, repr=False)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.sites if self.sites else 0.0


def pseudo_image(name: str, result, settings: AdaptSettings) -> PseudoImage:
    """Pseudo-labels of one labelled image.

    Parameters
    ----------
    name : str
        Its output name.
    result : training.experiments.label.LabelResult
        From :func:`~training.experiments.label.label_image`.
    settings : AdaptSettings

    Returns
    -------
    PseudoImage
        ``sample`` (None when fewer than ``settings.min_kept`` of the sites are labelled) is
        a :class:`training.finetune.HumanSample` whose ``class_id`` holds
        :data:`~simgen.labels.UNLABELLED` at the unsure sites.
    """
    from training.finetune import HumanSample

    cat = result.catalogue
    cid = np.asarray(cat.class_id, dtype=np.int64)
    raw = np.asarray(cat.probability, dtype=np.float64).copy()  # empty sites: as labelled
    n_det = len(result.column_probs)
    if n_det:  # detected columns: the network's probability before the constraint
        raw[:n_det] = np.asarray(result.column_probs)[np.arange(n_det), cid[:n_det]]
    labels = pseudo_labels(cat.site, cid, raw, settings.min_probability)
    item = PseudoImage(name, len(labels), int(np.sum(labels != UNLABELLED)))
    if len(labels) and item.kept_fraction >= settings.min_kept:
        im = result.image
        item.sample = HumanSample(
            name, np.asarray(im.data, np.float32), float(im.pixel_size_A),
            np.asarray(cat.x_px, float), np.asarray(cat.y_px, float), labels,
        )  # fmt: skip
    return item


def held_out_f1(model, data) -> dict:
    """Macro F1 (mean column F1 over the classes present) of ``model`` on the simulated
    held-out samples of a training data config: its ``val_stores`` (``val_range``), or the
    validation part of each training store (:func:`training.stores.split_indices`).

    Parameters
    ----------
    model : path-like
    data : training.config.DataConfig

    Returns
    -------
    dict
        ``stores`` (path → macro F1), ``mean`` and ``samples``.

    Raises
    ------
    ValueError
        No held-out simulated sample (``val_fraction`` 0 and no ``val_stores``).
    """
    from training.evaluate import evaluate_stores
    from training.stores import open_store, split_indices

    jobs = []
    if data.val_stores:
        for path in data.val_stores:
            n = open_store(path).n_samples
            jobs.append((str(path), tuple(data.val_range or (0, n))))
    else:
        for path in data.train_stores:
            st = open_store(path)
            _, val = split_indices(
                st,
                val_fraction=data.val_fraction,
                train_range=data.train_range,
                val_range=data.val_range,
            )
            if len(val):  # fmt: skip
                jobs.append((str(path), (int(val.min()), int(val.max()) + 1)))
    if not jobs:
        raise ValueError(
            "the run has no simulated validation samples (data.val_fraction 0 and no "
            "val_stores): adapt could not check that it does no harm there"
        )
    per_store, samples = {}, 0
    for path, span in jobs:
        summary = evaluate_stores(model, [path], sample_range=span)
        per_store[path] = macro_f1(summary)
        samples += int(summary.get("n_images") or 0)
    values = [v for v in per_store.values() if v is not None]
    if not values:
        raise ValueError("no class with true columns in the simulated validation samples")
    return {"stores": per_store, "mean": float(np.mean(values)), "samples": samples}


def macro_f1(summary: dict) -> float | None:
    """Mean F1 over the classes with true columns in an evaluation summary (a class with
    true columns and no F1 counts 0)."""
    f1 = [
        float(e.get("f1") or 0.0) for e in summary.get("classes", {}).values() if e.get("support")
    ]
    return float(np.mean(f1)) if f1 else None


def image_figures(label_run) -> dict:
    """Per labelled image: quality verdict, honeycomb consistency, sites found and the
    per-site fraction of every class (from each image's ``summary.json``)."""
    out = {}
    for name in _labelled_names(label_run.outdir):
        summary = json.loads((label_run.outdir / name / "summary.json").read_text())
        q = summary.get("quality", {})
        out[name] = {
            "verdict": q.get("verdict"),
            "honeycomb_consistency": q.get("honeycomb_consistency"),
            "sites_detected_fraction": q.get("sites_detected_fraction"),
            "fractions": {
                k: v.get("per_site")
                for k, v in summary.get("classes", {}).items()
                if v.get("count")
            },
        }
    return out


def _labelled_names(folder: Path) -> list[str]:
    from training.experiments.review import find_label_images

    return list(find_label_images(folder))


@dataclass
class AdaptReport:
    """What :func:`adapt` did and measured (also written to ``OUT/adapt.json``)."""

    out: str
    settings: dict
    rounds: list[dict]
    images_before: dict
    images_after: dict
    f1_before: dict
    f1_after: dict

    @property
    def f1_drop(self) -> float:
        """Simulated held-out macro F1 before minus after (positive: adaptation lost)."""
        return float(self.f1_before["mean"] - self.f1_after["mean"])

    @property
    def f1_ok(self) -> bool:
        return self.f1_drop <= self.settings["max_f1_loss"] + 1e-12


def adapt(
    run,
    images,
    out,
    *,
    settings: AdaptSettings | None = None,
    stores: Sequence[str] | None = None,
    material: str | None = None,
    pixel_size_A: float | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    overrides: dict | None = None,
    device: str = "auto",
) -> AdaptReport:
    """Self-train ``run`` on the unlabelled real ``images`` into the folder ``out``.

    Parameters
    ----------
    run : path-like
        A trained model (checkpoint, run or ensemble folder).
    images : iterable of path-like or str
        Microscope files, folders or glob patterns (as for ``simgen-train label``).
    out : path-like
        New folder (refused when it holds files adapt did not write).
    settings : AdaptSettings, optional
    stores : sequence of str, optional
        Simulated training stores (default: the run's).
    material, pixel_size_A
        As for ``simgen-train label`` (FFT calibration, lattice constant; pixel size of files
        without one) [Å/px].
    progress : bool
        Progress bars.
    echo : callable, optional
        Receives one line per step (default: print).
    overrides : dict, optional
        Further training config keys for every round (``{"optim.lr": 1e-4}``).
    device : str
        Where labelling and training run: ``auto`` (a GPU when there is one), ``cpu``,
        ``cuda`` or ``cuda:N``.

    Returns
    -------
    AdaptReport
    """
    from simgen.experiment.readers import expand_inputs
    from simgen.store import write_json
    from training.experiments.label import label_files
    from training.finetune import continued_config, mix_config, store_for, train_config
    from training.predict import Ensemble, resolve_checkpoints
    from training.report import claim_output_folder
    from training.train import resolve_device

    settings = settings or AdaptSettings()
    say = echo or print
    out = Path(out)
    files, missing = expand_inputs(list(images))
    if missing:
        what, reason = missing[0]
        raise ValueError(f"{what}: {reason}")
    if not files:
        raise ValueError("no image given")
    resolve_checkpoints(run)  # a wrong model path: one-line error before anything is written
    torch_device = resolve_device(device)  # CUDA asked for and absent: likewise
    claim_output_folder(out, tool="simgen-train adapt", marker=".simgen-adapt", is_ours=_is_ours)
    base = continued_config(run, out / "round_1", stores=stores)
    sim = tuple(base.data.train_stores)
    lr = base.optim.lr * settings.lr_scale

    def label_with(model, r):
        ensemble = Ensemble.load(model, torch_device)
        results = {}
        labelled = label_files(
            files, ensemble, out / f"labels_round_{r}", material=material,
            pixel_size_A=pixel_size_A, progress=progress, echo=lambda line: None, tta=False,
            on_result=results.__setitem__,
        )  # fmt: skip
        for what, reason in labelled.failures:
            say(f"  not labelled: {reason if reason.startswith(what) else what + ': ' + reason}")
        if not labelled.labelled:
            which = "the model given" if r == 0 else f"the model of round {r}"
            raise ValueError(
                f"{which} labels none of the {len(files)} image(s) (see "
                f"{labelled.outdir / 'failures.txt'})"
                + ("" if r == 0 else "; adaptation failed: keep the model given")
            )
        return labelled, results

    say(f"adapt: {len(files)} image(s), {settings.rounds} round(s); simulated held-out F1 ...")
    f1_before = held_out_f1(run, base.data)
    labelled, results = label_with(run, 0)
    before = image_figures(labelled)
    _say_figures(say, "before", before, f1_before)
    model, rounds = run, []
    for r in range(1, settings.rounds + 1):
        pseudo = [pseudo_image(name, res, settings) for name, res in results.items()]
        used = [p for p in pseudo if p.sample is not None]
        kept = sum(p.kept for p in used) / max(1, sum(p.sites for p in used))
        say(
            f"round {r}: {len(used)} of {len(pseudo)} image(s) pseudo-labelled, "
            f"{kept:.1%} of their sites kept (probability >= {settings.min_probability})"
        )
        if not used:
            raise ValueError(
                f"round {r}: no image has {settings.min_kept:.0%} of its sites labelled with "
                f"probability >= {settings.min_probability}; lower --min-probability or "
                "--min-kept, or train on data closer to these images (simgen match)"
            )
        target = out / f"round_{r}"
        changes = {"epochs": settings.epochs, "optim.lr": lr, "device": device}
        changes.update(overrides or {})
        cfg = continued_config(model, target, stores=sim, overrides=changes)
        human = store_for([p.sample for p in used], target, sim, train_only=True)
        train_config(mix_config(cfg, human, settings.real_fraction), target)
        model = target
        labelled, results = label_with(model, r)
        rounds.append(
            {
                "round": r,
                "images_used": [p.name for p in used],
                "images_left_out": [p.name for p in pseudo if p.sample is None],
                "kept_fraction": {p.name: p.kept_fraction for p in pseudo},
                "model": str(target),
            }
        )
    checkpoints = [str(Path(p).resolve().relative_to(out.resolve())) for p in
                   resolve_checkpoints(model)]  # fmt: skip
    write_json({"members": checkpoints, "adapted_from": str(run)}, out / "ensemble.json")
    f1_after = held_out_f1(out, base.data)
    after = image_figures(labelled)
    _say_figures(say, "after", after, f1_after)
    report = AdaptReport(str(out), asdict(settings), rounds, before, after, f1_before, f1_after)
    write_json({**asdict(report), "f1_drop": report.f1_drop, "f1_ok": report.f1_ok},
               out / REPORT)  # fmt: skip
    write_json({"tool": "simgen-train adapt", "finished": True}, out / ".simgen-adapt")
    say(
        f"simulated held-out macro F1: {f1_before['mean']:.4f} -> {f1_after['mean']:.4f} "
        f"({-report.f1_drop:+.4f}; allowed drop {settings.max_f1_loss})"
    )
    return report


def _is_ours(path: Path) -> bool:
    return (path / ".simgen-adapt").is_file()


def _say_figures(say, when: str, figures: dict, f1: dict) -> None:
    f1_text = "n/a" if f1.get("mean") is None else f"{f1['mean']:.4f}"
    say(f"{when}: simulated held-out macro F1 {f1_text}")
    for name, fig in figures.items():
        h = fig.get("honeycomb_consistency")
        fr = ", ".join(f"{k} {v:.3f}" for k, v in sorted(fig["fractions"].items()) if v is not None)
        h_text = "n/a" if h is None else f"{h:.3f}"
        say(f"  {name}: quality {fig.get('verdict')}, honeycomb {h_text}; {fr}")
