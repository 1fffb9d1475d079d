"""Noise studies: one model per training-noise bin, every model scored on a paired test sweep.

2DIP-Net's question (``docs/noise_study.md``): which range of training noise transfers
best? :func:`run_noise_study` answers it in one call:

1. read the training sweep (a ``simgen sweep`` directory and its ``sweep.json``) and the test
   sweep (the same kind of directory, generated with another ``--seed``), and optional
   extra labelled stores or folders of stores; check that every store exists and that all
   share one label scheme, and that no test store shares the training stores' dataset seed;
2. train one model per training bin into ``OUT/models/<bin>/`` (``train_model``; a finished
   model is reused, an interrupted one resumed from its ``last.pt``);
3. score every model on every test bin and extra set (``evaluate_stores``); each score is
   cached in ``OUT/evaluations/<bin>/<test>.json`` under a key made of the SHA-256 of the
   checkpoint file(s), a fingerprint of the test store(s) (attributes and completion flags)
   and the evaluation settings, so a re-run computes only what is missing or stale;
4. write the report: ``results.csv`` (one row per training bin × test set: detection
   precision, recall and F1, macro F1, macro defect F1, per-class F1), heatmaps of detection
   F1 and macro defect F1 over training × test bins, F1 against the test noise level per
   model, and ``summary.md`` naming the best training bin per test bin.

The study settings are a frozen, validated :class:`NoiseStudyConfig` (YAML round trip,
``--set`` overrides) holding a :class:`~training.config.TrainConfig` for the models.
Importing this module does not import torch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simgen.configbase import Config, check_pair, check_range, described
from structures.columns import defect_classes
from training.config import TrainConfig, annotated_yaml

logger = logging.getLogger(__name__)
CHECKPOINTS = ("best", "last")
METHODS = ("hungarian", "greedy")
SELECT_METRICS = ("macro_defect_f1", "detection_f1")
METRIC_NAMES = {"macro_defect_f1": "macro defect F1", "detection_f1": "detection F1"}
#: Noise variables of a sweep (keys of ``levels`` in ``sweep.json``) and their symbols.
VARIABLES = {"lambda": "λ", "sigma": "σ"}


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyEvalConfig(Config):
    """How every model is scored on the test sets."""

    checkpoint: str = described(
        "Checkpoint of each model to score: best (best.pt) or last.", "best"
    )
    sample_range: tuple[int, int] | None = described(
        "[start, stop) samples of each test store; null = all complete samples.", None
    )
    radius_A: float | None = described(
        "Column matching radius [Å]; null = the one each model was trained with.", None
    )
    method: str = described("Column matching: hungarian or greedy.", "hungarian")
    tile: int = described("Inference tile size [px].", 256)
    overlap: int = described("Overlap of inference tiles [px].", 32)
    tta: bool = described("Average the 8 flips/rotations at inference (8x slower).", False)

    def __post_init__(self):
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint: expected one of {CHECKPOINTS}, got {self.checkpoint!r}")
        check_pair("sample_range", self.sample_range, integer=True, low=0)
        if self.sample_range is not None and self.sample_range[0] == self.sample_range[1]:
            raise ValueError(f"sample_range: empty range {list(self.sample_range)}")
        if self.radius_A is not None:
            check_range("radius_A", self.radius_A, 0.0, low_open=True)
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        check_range("tile", self.tile, 16)
        check_range("overlap", self.overlap, 0)
        if self.overlap >= self.tile:
            raise ValueError(f"overlap: must be < tile ({self.tile}), got {self.overlap}")


@dataclass(frozen=True)
class ReportConfig(Config):
    """What the report averages and how it picks the best training bin."""

    defect_classes: tuple[str, ...] | None = described(
        "Classes averaged into the macro defect F1; null = by the label scheme "
        "(every class but background, metal, chalcogen and full host compositions).",
        None,
    )
    select_by: str = described(
        "Metric naming the best training bin per test bin: macro_defect_f1 or detection_f1.",
        "macro_defect_f1",
    )
    dpi: int = described("Resolution of the PNG figures [dots per inch].", 100)
    bootstrap: int = described(
        "Bootstrap resamples of the test images for every interval (0 = no intervals).", 1000
    )
    confidence: float = described("Coverage of the intervals.", 0.95)
    bootstrap_seed: int = described("Seed of the resamples (same seed, same intervals).", 0)

    def __post_init__(self):
        check_range("bootstrap", self.bootstrap, 0)
        if self.bootstrap and self.bootstrap < 100:
            raise ValueError(
                f"bootstrap: expected 0 or at least 100 resamples, got {self.bootstrap}"
            )
        check_range("confidence", self.confidence, 0.5, 0.999)
        if self.defect_classes is not None and not all(
            isinstance(c, str) and c for c in self.defect_classes
        ):
            raise ValueError("defect_classes: expected a list of class names")
        if self.select_by not in SELECT_METRICS:
            raise ValueError(f"select_by: expected one of {SELECT_METRICS}, got {self.select_by!r}")
        check_range("dpi", self.dpi, 30, 600)


@dataclass(frozen=True)
class NoiseStudyConfig(Config):
    """A whole noise study: sweeps, the training recipe of every model, scoring, report."""

    train_sweep: str | None = described(
        "Training sweep directory (`simgen sweep`): one model per store of its sweep.json.", None
    )
    test_sweep: str | None = described(
        "Paired test sweep directory (same bins or others, generated with another --seed).",
        None,
    )
    train_bins: tuple[str, ...] = described(
        "Names of the training bins to use (store names in sweep.json); empty = all.",
        factory=tuple,
    )
    test_bins: tuple[str, ...] = described(
        "Names of the test bins to use; empty = all.", factory=tuple
    )
    extra_stores: tuple[str, ...] = described(
        "Further labelled test sets: a store, or a folder whose *.zarr stores are pooled.",
        factory=tuple,
    )
    allow_shared_seed: bool = described(
        "Allow test stores with the training stores' dataset seed (same structures: a leak).",
        False,
    )
    repeats: int = described(
        "Models per training bin, on the same store, with seeds train.seed + k * train.members "
        "(k = 0..repeats-1); the report gives their mean and standard deviation.",
        1,
    )
    train: TrainConfig = described(
        "Training config of every model; data.train_stores is set per bin by the study.",
        factory=TrainConfig,
    )
    evaluate: StudyEvalConfig = described("Scoring on the test sets.", factory=StudyEvalConfig)
    report: ReportConfig = described("Report settings.", factory=ReportConfig)

    def __post_init__(self):
        check_range("repeats", self.repeats, 1)
        for name in ("train_sweep", "test_sweep"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ValueError(f"{name}: expected a directory path, got an empty string")
        for name in ("train_bins", "test_bins", "extra_stores"):
            items = getattr(self, name)
            if not all(isinstance(v, str) and v for v in items):
                raise ValueError(f"{name}: expected a list of non-empty strings")
            if len(set(items)) != len(items):
                raise ValueError(f"{name}: duplicate entries in {list(items)}")
        if self.train.data.train_stores or self.train.data.val_stores:
            raise ValueError(
                "train.data.train_stores/val_stores: leave them empty; the study trains each "
                "model on one bin's store and validates on its last val_fraction"
            )


def study_yaml(config: NoiseStudyConfig | None = None) -> str:
    """Annotated YAML of a study config (every key with its help as a comment).

    Parameters
    ----------
    config : NoiseStudyConfig, optional
        Default study when omitted.

    Returns
    -------
    str
        YAML that :meth:`NoiseStudyConfig.from_yaml` reads back to the same config.
    """
    config = NoiseStudyConfig() if config is None else config
    body = [line for line in annotated_yaml(config).splitlines() if not line.startswith("#")]
    header = [
        "# simgen-train noise-study configuration (docs/noise_study.md).",
        "# Any key may be left out; unknown keys are refused. `train` is a training config",
        "# (docs/training.md) applied to every model.",
    ]
    return "\n".join(header + body) + "\n"


def load_study_config(path=None, overrides=None, **direct) -> NoiseStudyConfig:
    """A study config from an optional YAML file, ``key.path=value`` overrides and options.

    Parameters
    ----------
    path : path-like, optional
        YAML file (the default study when omitted).
    overrides : list of str, optional
        ``dotted.key=value`` strings, values parsed as YAML (``train.epochs=10``).
    **direct
        Dotted keys set from command-line options (``None`` values are ignored).

    Returns
    -------
    NoiseStudyConfig

    Raises
    ------
    ValueError
        Missing or invalid file, malformed override, invalid value.
    """
    return NoiseStudyConfig.load_with_overrides(path, overrides or (), direct)


# ---------------------------------------------------------------------------------------
# sweeps and test sets
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseBin:
    """One training bin or one test set of a study.

    Attributes
    ----------
    name : str
        Store name in ``sweep.json`` (``lambda5-20``), or ``extra-<name>`` for extra sets.
    stores : tuple of str
        Store path(s); a sweep bin has one, an extra folder may pool several.
    levels : dict
        ``{"lambda": [low, high], "sigma": [low, high]}`` as in ``sweep.json`` (either key
        may be absent); empty for extra sets.
    kind : {"sweep", "extra"}
    """

    name: str
    stores: tuple[str, ...]
    levels: dict = field(default_factory=dict)
    kind: str = "sweep"

    @property
    def label(self) -> str:
        """Short display name: ``λ 5–20``, ``λ 0 (none)``, ``σ 0.5``, ``extra: exp``."""
        if self.kind == "extra":
            return f"extra: {self.name.removeprefix('extra-')}"
        parts = []
        for key, symbol in VARIABLES.items():
            if key not in self.levels:
                continue
            lo, hi = self.levels[key]
            if key == "lambda" and hi == 0:
                parts.append("λ 0 (none)")
            elif lo == hi:
                parts.append(f"{symbol} {lo:g}")
            else:
                parts.append(f"{symbol} {lo:g}–{hi:g}")
        return ", ".join(parts) or self.name


def read_sweep(directory, what: str = "sweep") -> list[NoiseBin]:
    """The stores of a ``simgen sweep`` directory, from its ``sweep.json``.

    Parameters
    ----------
    directory : path-like
        Directory holding ``sweep.json`` and the stores it lists (paths relative to it).
    what : str
        Name used in error messages (``train_sweep``, ``test_sweep``).

    Returns
    -------
    list of NoiseBin
        In manifest order.

    Raises
    ------
    ValueError
        Missing directory or manifest, invalid JSON, no stores listed, malformed or
        duplicate entries, a listed store that does not exist.
    """
    d = Path(directory)
    if not d.exists():
        raise ValueError(f"{what}: directory not found: {d}")
    if not d.is_dir():
        raise ValueError(f"{what}: not a directory: {d}")
    manifest = d / "sweep.json"
    if not manifest.is_file():
        raise ValueError(f"{what}: {d} has no sweep.json (make the sweep with `simgen sweep`)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {manifest} is not valid JSON ({err.msg})") from None
    entries = data.get("stores") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{what}: {manifest} lists no stores")
    bins, seen = [], set()
    for k, entry in enumerate(entries):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and entry["name"]
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("levels", {}), dict)
        ):
            raise ValueError(f"{what}: {manifest}: store entry {k} needs a name and a path")
        name = entry["name"]
        if name in seen:
            raise ValueError(f"{what}: {manifest}: store name {name!r} appears twice")
        seen.add(name)
        store = d / entry["path"]
        if not store.exists():
            raise ValueError(f"{what}: store {name!r} not found: {store}")
        levels = {}
        for key, value in entry.get("levels", {}).items():
            if key in VARIABLES:
                try:
                    lo, hi = (float(v) for v in value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{what}: {manifest}: levels.{key} of {name!r} is not [low, high]"
                    ) from None
                levels[key] = [lo, hi]
        bins.append(NoiseBin(name, (str(store.resolve()),), levels))
    return bins


def _select(bins: list[NoiseBin], names, what: str) -> list[NoiseBin]:
    if not names:
        return bins
    by_name = {b.name: b for b in bins}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"{what}: unknown bin {unknown[0]!r}; the sweep has {', '.join(by_name)}")
    return [by_name[n] for n in names]


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def extra_set(path, taken=()) -> NoiseBin:
    """A user-supplied test set: one store, or a folder whose stores are pooled.

    Parameters
    ----------
    path : path-like
        A Zarr store, or a folder holding stores (its ``*.zarr`` children).
    taken : collection of str
        Names already used; the set's name gets a numeric suffix if it clashes.

    Returns
    -------
    NoiseBin
        ``kind="extra"``, named ``extra-<stem>``.

    Raises
    ------
    ValueError
        When the path does not exist or holds no store.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"extra store not found: {p}")
    if _is_store(p):
        stores = [p]
    elif p.is_dir():
        stores = sorted(c for c in p.iterdir() if c.suffix == ".zarr" and _is_store(c))
        if not stores:
            raise ValueError(f"extra store: {p} is neither a Zarr store nor a folder of stores")
    else:
        raise ValueError(f"extra store: {p} is not a Zarr store")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.resolve().name.removesuffix(".zarr")) or "set"
    name, k = f"extra-{stem}", 2
    while name in taken:
        name, k = f"extra-{stem}-{k}", k + 1
    return NoiseBin(name, tuple(str(s.resolve()) for s in stores), {}, "extra")


def _dataset_seed(path: str):
    from training.stores import open_store

    config = open_store(path).root.attrs.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset.get("seed") if isinstance(dataset, dict) else None


@dataclass(frozen=True)
class StudyPlan:
    """What a study trains and scores, checked before any work starts.

    Attributes
    ----------
    train_bins : list of NoiseBin
        One model each.
    test_bins : list of NoiseBin
        The test sweep's bins, then the extra sets.
    class_names : list of str
        Classes of the shared label scheme by id (0 = background).
    defect_classes : list of str
        Classes averaged into the macro defect F1.
    scheme : dict
        The label scheme ``{"ids", "names"}``.
    """

    train_bins: list
    test_bins: list
    class_names: list
    defect_classes: list
    scheme: dict


def plan_study(config: NoiseStudyConfig) -> StudyPlan:
    """Read the sweeps and test sets of a study and check them.

    Parameters
    ----------
    config : NoiseStudyConfig

    Returns
    -------
    StudyPlan

    Raises
    ------
    ValueError
        A sweep is not given, missing or malformed; a bin name is unknown; a store is
        missing or not a simgen store; the stores do not share one label scheme; a test
        store has the training stores' dataset seed (unless ``allow_shared_seed``); a
        configured defect class is not in the scheme.
    """
    from training.stores import check_scheme, open_store

    if config.train_sweep is None:
        raise ValueError("train_sweep: give the training sweep directory (argument or config)")
    if config.test_sweep is None:
        raise ValueError("test_sweep: give the test sweep directory (--test or config)")
    train = _select(read_sweep(config.train_sweep, "train_sweep"), config.train_bins, "train_bins")
    test = _select(read_sweep(config.test_sweep, "test_sweep"), config.test_bins, "test_bins")
    extras: list[NoiseBin] = []
    for p in config.extra_stores:
        extras.append(extra_set(p, {b.name for b in test + extras}))
    first = open_store(train[0].stores[0])
    for b in train[1:]:
        st = open_store(b.stores[0])
        check_scheme(st.scheme, first.scheme, f"training store {st.path}", f"{first.path}'s")
    for b in test + extras:
        for path in b.stores:
            st = open_store(path)
            check_scheme(st.scheme, first.scheme, f"test store {st.path}", "the training stores'")
    train_seeds = {_dataset_seed(p) for b in train for p in b.stores} - {None}
    if not config.allow_shared_seed:
        for b in test + extras:
            for path in b.stores:
                seed = _dataset_seed(path)
                if seed in train_seeds:
                    raise ValueError(
                        f"test store {path} has dataset seed {seed}, like the training stores, "
                        "so it holds the training structures; generate the test sweep with "
                        "another --seed (or set allow_shared_seed: true)"
                    )
    names = first.scheme.class_names
    if config.report.defect_classes is not None:
        unknown = [c for c in config.report.defect_classes if c not in names[1:]]
        if unknown:
            raise ValueError(
                f"report.defect_classes: {unknown[0]!r} is not a class of the label scheme "
                f"({', '.join(names[1:])})"
            )
        defects = list(config.report.defect_classes)
    else:
        defects = defect_classes(names)
    return StudyPlan(train, test + extras, names, defects, first.scheme.to_dict())


# ---------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------
def macro_f1(classes: dict, names=None) -> float | None:
    """Mean column F1 over classes with true columns (``support > 0``).

    A class with support but no correct detection counts as 0; a class without true
    columns in the test set is left out (its false detections still lower the other
    classes' precision through the confusion). This is ``val_macro_f1`` of training.

    Parameters
    ----------
    classes : dict
        ``summary()["classes"]`` of :class:`training.metrics.ColumnScores`.
    names : iterable of str, optional
        Only these classes (default: all).

    Returns
    -------
    float or None
        ``None`` when no selected class has true columns.
    """
    keep = classes if names is None else {n: classes[n] for n in names if n in classes}
    f1s = [c["f1"] or 0.0 for c in keep.values() if c["support"]]
    return float(np.mean(f1s)) if f1s else None


def result_row(train: NoiseBin, test: NoiseBin, result: dict, plan: StudyPlan) -> dict:
    """One line of ``results.csv`` from an :func:`~training.evaluate.evaluate_stores` result.

    Returns
    -------
    dict
        ``train_bin``, ``test_bin``, ``test_kind``, the bins' noise ranges
        (``train_lambda_low`` ... ``test_sigma_high``, ``None`` when not varied),
        ``n_images``, ``detection_precision``, ``detection_recall``, ``detection_f1``,
        ``macro_f1``, ``macro_defect_f1`` and ``f1_<class>`` for every class.
    """
    row = {"train_bin": train.name, "test_bin": test.name, "test_kind": test.kind}
    for who, b in (("train", train), ("test", test)):
        for key in VARIABLES:
            lo, hi = b.levels.get(key, (None, None))
            row[f"{who}_{key}_low"], row[f"{who}_{key}_high"] = lo, hi
    det = result["detection"]
    classes = result["classes"]
    row.update(
        {
            "n_images": result["n_images"],
            "detection_precision": det["precision"],
            "detection_recall": det["recall"],
            "detection_f1": det["f1"],
            "macro_f1": macro_f1(classes),
            "macro_defect_f1": macro_f1(classes, plan.defect_classes),
        }
    )
    for name in plan.class_names[1:]:
        row[f"f1_{name}"] = classes.get(name, {}).get("f1")
    return row


# ---------------------------------------------------------------------------------------
# resumable work
# ---------------------------------------------------------------------------------------
def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def store_fingerprint(path) -> str:
    """SHA-256 of a store's root attributes and completion flags.

    The attributes hold the full dataset config, the creation time and the calibration,
    so a regenerated, continued or different store gets another fingerprint; a store
    moved elsewhere keeps its own.

    The store is read through :func:`training.stores.open_store` (schema checked, damaged
    completion flags reported as one :class:`~training.stores.StoreError` naming the store).
    """
    from training.stores import open_store

    st = open_store(path)
    h = hashlib.sha256()
    h.update(json.dumps(dict(st.root.attrs), sort_keys=True, default=str).encode())
    h.update(np.asarray(st.complete, dtype=np.uint8).tobytes())
    return h.hexdigest()


def evaluation_key(checkpoint_hashes, store_fingerprints, settings: dict) -> str:
    """Cache key of one evaluation: checkpoint bytes + test store(s) + settings."""
    payload = {
        "checkpoints": list(checkpoint_hashes),
        "stores": list(store_fingerprints),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def bin_train_config(train: TrainConfig, b: NoiseBin, repeat: int = 0) -> TrainConfig:
    """The training config of repeat ``repeat`` of bin ``b``'s model.

    The bin's store is the only training store; repeat ``k`` has seed
    ``train.seed + k * train.members`` (so no two repeats share an ensemble member's seed).
    """
    data = {**train.data.to_dict(), "train_stores": list(b.stores)}
    return train.replace(data=data, seed=train.seed + repeat * train.members)


@dataclass(frozen=True)
class ModelUnit:
    """One trained model (or ensemble) of a study: bin, repeat, config and folders.

    ``run_dir`` is ``models/<bin>/`` and ``eval_dir`` ``evaluations/<bin>/`` for a study of
    one repeat; ``.../repeat_KK/`` below them otherwise.
    """

    bin: NoiseBin
    repeat: int
    config: TrainConfig
    run_dir: Path
    eval_dir: Path

    @property
    def name(self) -> str:
        """``<bin>`` or ``<bin>/repeat_KK``."""
        if self.run_dir.name == self.bin.name:
            return self.bin.name
        return f"{self.bin.name}/{self.run_dir.name}"


def model_units(config: NoiseStudyConfig, plan: StudyPlan, out) -> list[ModelUnit]:
    """Every model of a study, bin by bin, repeat by repeat."""
    out = Path(out)
    units = []
    for b in plan.train_bins:
        for k in range(config.repeats):
            sub = () if config.repeats == 1 else (f"repeat_{k:02d}",)
            units.append(
                ModelUnit(
                    b,
                    k,
                    bin_train_config(config.train, b, k),
                    out.joinpath("models", b.name, *sub),
                    out.joinpath("evaluations", b.name, *sub),
                )
            )
    return units


def _member_dirs(config: TrainConfig, run_dir: Path):
    from training.train import member_config

    if config.members == 1:
        return [(run_dir, config)]
    return [(run_dir / f"member_{k:02d}", member_config(config, k)) for k in range(config.members)]


def model_state(config: TrainConfig, run_dir) -> str:
    """Whether the model of ``config`` in ``run_dir`` is ``"new"``, ``"partial"`` or ``"done"``.

    Parameters
    ----------
    config : TrainConfig
        The bin's config (:func:`bin_train_config`); ensembles are checked member by member.
    run_dir : path-like

    Returns
    -------
    str

    Raises
    ------
    ValueError
        A checkpoint there was trained with another config (apart from runtime fields).
    """
    from training.config import diff_configs
    from training.train import load_checkpoint_dict

    run_dir = Path(run_dir)
    states = []
    for d, cfg in _member_dirs(config, run_dir):
        last = d / "last.pt"
        if not last.is_file():
            states.append("new")
            continue
        ckpt = load_checkpoint_dict(last)
        diff = diff_configs(TrainConfig.from_dict(ckpt["config"]).math_dict(), cfg.math_dict())
        if diff:
            raise ValueError(
                f"{d} holds a model trained with another config ({', '.join(diff)} differ); "
                "restore the study config or use another output directory"
            )
        states.append("done" if int(ckpt["epoch"]) >= cfg.epochs else "partial")
    if config.members > 1 and not (run_dir / "ensemble.json").is_file() and "done" in states:
        states.append("partial")
    if all(s == "done" for s in states):
        return "done"
    return "new" if all(s == "new" for s in states) else "partial"


def model_checkpoints(config: TrainConfig, run_dir, which: str = "best") -> list[Path]:
    """Checkpoint file(s) of a bin's model (``best.pt``, or ``last.pt`` when there is none).

    Raises
    ------
    ValueError
        When a member has no checkpoint.
    """
    paths = []
    for d, _ in _member_dirs(config, Path(run_dir)):
        p = d / f"{which}.pt"
        if not p.is_file():
            p = d / "last.pt"
        if not p.is_file():
            raise ValueError(f"{d}: no checkpoint to evaluate")
        paths.append(p)
    return paths


@dataclass
class StudyResult:
    """What :func:`run_noise_study` did.

    Attributes
    ----------
    out_dir : pathlib.Path
    plan : StudyPlan
    rows : list of dict
        The lines of ``results.csv``: per training bin × test set, the mean over repeats of
        :func:`result_row` with ``n_repeats``, ``<F1>_sd``, ``<F1>_ci_low`` and
        ``<F1>_ci_high`` (:func:`summarise_repeats`).
    repeat_rows : list of dict
        One :func:`result_row` per model (bin, repeat) and test set, with ``repeat`` and
        ``seed`` (``repeats.csv``).
    counts : dict
        ``(bin, repeat, test) -> (samples, per-image column counts)`` of every evaluation.
    intervals : StudyIntervals or None
        The bootstrap resamples behind the intervals (``None`` when ``report.bootstrap``
        is 0).
    trained : list of str
        Models (``<bin>`` or ``<bin>/repeat_KK``) trained or resumed in this call.
    reused_models : list of str
        Models whose finished run was reused.
    evaluated, reused_evaluations : list of (str, str)
        ``(model, test set)`` scored in this call / read from the cache.
    seconds : dict
        Wall time of ``train``, ``evaluate``, ``report`` and ``total``.
    files : dict
        Report files by name (``results``, ``summary``, ``heatmap_detection_f1``, ...).
    """

    out_dir: Path
    plan: StudyPlan
    rows: list = field(default_factory=list)
    repeat_rows: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    intervals: object = None
    trained: list = field(default_factory=list)
    reused_models: list = field(default_factory=list)
    evaluated: list = field(default_factory=list)
    reused_evaluations: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def _read_cached(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return data.get("result")


def run_noise_study(
    config: NoiseStudyConfig,
    out_dir,
    *,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Train ``repeats`` models per training bin, score all on all test sets, write the report.

    Re-running with the same config does only missing work: a finished model (its
    ``last.pt`` at the last epoch, same config) is not retrained, an interrupted one is
    resumed, and an evaluation is read from ``OUT/evaluations/<bin>/<test>.json`` when its
    key (checkpoint SHA-256, test store fingerprint, settings) matches.

    Parameters
    ----------
    config : NoiseStudyConfig
    out_dir : path-like
        Study directory: ``study.yaml``, ``study.log``, ``models/<bin>/``,
        ``evaluations/<bin>/<test>.json`` (``.../repeat_KK/`` with repeats), and the
        report (``results.csv``, ``repeats.csv``, ``summary.md``, the heatmaps,
        ``f1_vs_<variable>.png``, ``study.json``).
    log : callable, optional
        Receives one line per step (also appended to ``study.log``).

    Returns
    -------
    StudyResult

    Raises
    ------
    ValueError
        Bad sweeps or stores (:func:`plan_study`), a damaged store
        (:class:`~training.stores.StoreError`), a model directory trained with another
        config, bad training settings.
    """
    t_start = time.perf_counter()
    plan = plan_study(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(study_yaml(config))
    result = StudyResult(out, plan)

    def say(text: str) -> None:
        with open(out / "study.log", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        logger.info("%s", text)
        if log is not None:
            log(text)

    units = model_units(config, plan, out)
    say(
        f"study: {len(plan.train_bins)} training bins x {config.repeats} repeat(s) x "
        f"{len(plan.test_bins)} test sets in {out}"
    )
    t0 = time.perf_counter()
    _train_models(units, say, result)
    result.seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _evaluate_models(config, plan, units, say, result)
    say(f"evaluations: {len(result.evaluated)} computed, {len(result.reused_evaluations)} reused")
    result.seconds["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.intervals = study_intervals(result, config)
    result.rows = summarise_repeats(result, config)
    result.files = write_report(result, config)
    result.seconds["report"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    _write_study_json(result, out / "study.json")
    say(f"report: {out / 'summary.md'} ({result.seconds['total']:.1f} s in all)")
    return result


def _train_models(units, say, result: StudyResult) -> None:
    """Train (or resume, or reuse) every model of the study."""
    from training.train import train_ensemble, train_model

    # refuse a model directory of another config before training anything
    states = {u.name: model_state(u.config, u.run_dir) for u in units}
    for k, u in enumerate(units, 1):
        cfg = u.config
        if states[u.name] == "done":
            say(f"model {k}/{len(units)} {u.name}: done, reused")
            result.reused_models.append(u.name)
            continue
        verb = "resuming" if states[u.name] == "partial" else "training"
        say(f"model {k}/{len(units)} {u.name}: {verb} ({cfg.epochs} epochs, seed {cfg.seed})")
        t1 = time.perf_counter()
        if cfg.members > 1:
            train_ensemble(cfg, u.run_dir, resume=True)
        else:
            train_model(cfg, u.run_dir, resume=True)
        say(f"model {u.name}: trained in {time.perf_counter() - t1:.1f} s")
        result.trained.append(u.name)


def _evaluate_models(config, plan, units, say, result: StudyResult) -> None:
    """Score every model on every test set (cached evaluations reused)."""
    ev = config.evaluate
    settings = {k: v for k, v in ev.to_dict().items() if k != "checkpoint"}
    settings["per_image"] = True  # older caches lack the per-image counts: recompute
    fingerprints = {t.name: [store_fingerprint(p) for p in t.stores] for t in plan.test_bins}
    for u in units:
        ckpts = model_checkpoints(u.config, u.run_dir, ev.checkpoint)
        hashes = [file_sha256(p) for p in ckpts]
        for t in plan.test_bins:
            key = evaluation_key(hashes, fingerprints[t.name], settings)
            path = u.eval_dir / f"{t.name}.json"
            scores = _read_cached(path, key)
            if scores is not None and "per_image" in scores:
                result.reused_evaluations.append((u.name, t.name))
            else:
                record = {
                    "key": key,
                    "train_bin": u.bin.name,
                    "repeat": u.repeat,
                    "seed": u.config.seed,
                    "test_set": t.name,
                    "checkpoints": [str(p) for p in ckpts],
                    "checkpoint_sha256": hashes,
                    "stores": list(t.stores),
                    "store_fingerprints": fingerprints[t.name],
                    "settings": settings,
                }
                scores = _evaluate_one(config, ckpts, t, record, path, u.name, say)
                result.evaluated.append((u.name, t.name))
            row = result_row(u.bin, t, scores, plan)
            result.repeat_rows.append({**row, "repeat": u.repeat, "seed": u.config.seed})
            per = scores["per_image"]
            result.counts[(u.bin.name, u.repeat, t.name)] = (
                [tuple(v) for v in per["samples"]],
                np.asarray(per["counts"], np.int64).reshape(len(per["samples"]), -1),
            )


def _evaluate_one(config, ckpts, test, record: dict, path: Path, name: str, say) -> dict:
    """Evaluate one model on one test set and cache the scores with ``record``."""
    from training.evaluate import evaluate_stores
    from training.report import write_json

    ev = config.evaluate
    t1 = time.perf_counter()
    scores = evaluate_stores(
        [str(p) for p in ckpts],
        list(test.stores),
        eval_overrides={"radius_A": ev.radius_A} if ev.radius_A is not None else None,
        sample_range=tuple(ev.sample_range) if ev.sample_range else None,
        device=config.train.device,
        tile=ev.tile,
        overlap=ev.overlap,
        tta=ev.tta,
        method=ev.method,
        per_image=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({**record, "result": scores}, path)
    det = scores["detection"]["f1"]
    say(
        f"evaluated {name} on {test.name}: {scores['n_images']} images, "
        f"detection F1 {det or 0:.4f} ({time.perf_counter() - t1:.1f} s)"
    )
    return scores


def _write_study_json(result: StudyResult, path: Path) -> None:
    from training.report import write_json

    plan = result.plan
    write_json(
        {
            "train_bins": [{"name": b.name, "levels": b.levels} for b in plan.train_bins],
            "test_sets": [
                {"name": t.name, "kind": t.kind, "levels": t.levels, "stores": list(t.stores)}
                for t in plan.test_bins
            ],
            "label_scheme": plan.scheme,
            "defect_classes": plan.defect_classes,
            "trained": result.trained,
            "reused_models": result.reused_models,
            "evaluated": [list(p) for p in result.evaluated],
            "reused_evaluations": [list(p) for p in result.reused_evaluations],
            "seconds": result.seconds,
            "files": {k: str(v) for k, v in result.files.items()},
        },
        path,
    )


# ---------------------------------------------------------------------------------------
# repeats and intervals
# ---------------------------------------------------------------------------------------
def interval_metrics(plan: StudyPlan) -> list[str]:
    """The F1s given an interval: detection, macro, macro defect and every class's."""
    return ["detection_f1", "macro_f1", "macro_defect_f1"] + [
        f"f1_{c}" for c in plan.class_names[1:]
    ]


@dataclass
class StudyIntervals:
    """Bootstrap values of every F1 of every model on every test set.

    Each test set's images are resampled ``n_resamples`` times (the same resamples for
    every model: paired); each bin's repeats are also resampled, independently per bin,
    for the comparisons of :meth:`between_seeds`.

    Attributes
    ----------
    n_resamples : int
    confidence : float
    values : dict
        ``(bin, test) -> {metric: ndarray (repeats, n_resamples)}``.
    repeat_draws : dict
        ``bin -> ndarray (n_resamples, repeats)`` of repeat indices.
    """

    n_resamples: int
    confidence: float
    values: dict
    repeat_draws: dict

    def over_images(self, bin_name: str, test: str, metric: str) -> np.ndarray:
        """Mean over the repeats of each image resample, shape ``(n_resamples,)``."""
        v = self.values[(bin_name, test)][metric]
        return _nanmean(v, axis=0)

    def between_seeds(self, bin_name: str, test: str, metric: str) -> np.ndarray:
        """Mean over *resampled* repeats of each image resample, shape ``(n_resamples,)``.

        Adds the spread between training seeds to the spread over test images; with one
        repeat it equals :meth:`over_images`.
        """
        v = self.values[(bin_name, test)][metric]  # (K, B)
        draws = self.repeat_draws[bin_name]  # (B, K)
        picked = v[draws.T, np.arange(v.shape[1])[None, :]]
        return _nanmean(picked, axis=0)

    def interval(self, values) -> tuple[float, float]:
        """Percentile interval of bootstrap values."""
        from training.intervals import percentile_interval

        return percentile_interval(values, self.confidence)


def _nanmean(values, axis):
    with warnings.catch_warnings():  # all-NaN slices: "Mean of empty slice" -> NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def study_intervals(result: StudyResult, config: NoiseStudyConfig) -> StudyIntervals | None:
    """Resample the test images of every evaluation of ``result`` (``result.counts``).

    Returns
    -------
    StudyIntervals or None
        ``None`` when ``report.bootstrap`` is 0.

    Raises
    ------
    ValueError
        When two models of the study were scored on different images of one test set
        (the resamples could not be paired).
    """
    from training.intervals import resample_weights, resampled_metrics, stream

    rep = config.report
    if not rep.bootstrap:
        return None
    plan = result.plan
    metrics = interval_metrics(plan)
    values, draws = {}, {}
    for b in plan.train_bins:
        rng = stream(rep.bootstrap_seed, f"repeats/{b.name}")
        draws[b.name] = rng.integers(0, config.repeats, size=(rep.bootstrap, config.repeats))
    for t in plan.test_bins:
        samples = None
        weights = None
        for b in plan.train_bins:
            per_repeat = []
            for k in range(config.repeats):
                got, counts = result.counts[(b.name, k, t.name)]
                if samples is None:
                    samples = got
                    rng = stream(rep.bootstrap_seed, f"images/{t.name}")
                    weights = resample_weights(len(samples), rep.bootstrap, rng)
                elif got != samples:
                    raise ValueError(
                        f"test set {t.name}: the models were scored on different samples "
                        "(a store changed during the study?); run the study again"
                    )
                per_repeat.append(
                    resampled_metrics(
                        counts,
                        weights,
                        plan.class_names,
                        plan.defect_classes,
                        undefined_as_zero=config.repeats > 1,
                    )
                )
            values[(b.name, t.name)] = {m: np.stack([v[m] for v in per_repeat]) for m in metrics}
    return StudyIntervals(rep.bootstrap, rep.confidence, values, draws)


def _mean_sd(values) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return None, None
    mean = float(np.mean(v)) if len(v) > 1 else v[0]
    return mean, (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def summarise_repeats(result: StudyResult, config: NoiseStudyConfig) -> list[dict]:
    """The rows of ``results.csv``: per training bin × test set, the mean over repeats.

    Every metric of :func:`result_row` is averaged over the repeats whose value is defined;
    with several repeats, a per-class F1 left undefined because a model made no detection
    of a class that has true columns counts 0 (the macro F1's rule), so a model that never
    predicts a class pulls the mean down instead of dropping out of it. ``n_repeats`` says
    how many models there are, and every F1 of
    :func:`interval_metrics` gets ``<F1>_sd`` (standard deviation over repeats, empty with
    one) and ``<F1>_ci_low``/``<F1>_ci_high`` (bootstrap interval over test images of the
    mean over repeats; empty when ``report.bootstrap`` is 0). With one repeat the metrics
    are those of the single model.
    """
    plan, boot = result.plan, result.intervals
    groups: dict = {}
    for row in result.repeat_rows:
        groups.setdefault((row["train_bin"], row["test_bin"]), []).append(row)
    f1s = interval_metrics(plan)
    layout_support = 3 + 2 * len(plan.class_names)  # first support column of the counts
    out = []
    for (b, t), rows in groups.items():
        if len(rows) > 1:
            rows = [dict(r) for r in rows]
            for r in rows:
                support = result.counts[(b, r["repeat"], t)][1].sum(0)[layout_support:]
                for c, name in enumerate(plan.class_names):
                    if c and r.get(f"f1_{name}") is None and support[c] > 0:
                        r[f"f1_{name}"] = 0.0
        first = rows[0]
        metric_keys = list(first)[list(first).index("n_images") + 1 : list(first).index("repeat")]
        row = {k: first[k] for k in list(first)[: list(first).index("n_images") + 1]}
        row["n_repeats"] = len(rows)
        for k in metric_keys:
            row[k] = _mean_sd(r[k] for r in rows)[0]
        for m in f1s:
            row[f"{m}_sd"] = _mean_sd(r[m] for r in rows)[1]
            lo, hi = (None, None)
            if boot is not None:
                lo, hi = boot.interval(boot.over_images(b, t, m))
            row[f"{m}_ci_low"] = None if lo is None or math.isnan(lo) else lo
            row[f"{m}_ci_high"] = None if hi is None or math.isnan(hi) else hi
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_results_csv(rows: list[dict], path) -> Path:
    """Write the result rows (full float precision, empty cells for undefined values)."""
    path = Path(path)
    fields = list(rows[0]) if rows else ["train_bin", "test_bin"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for row in rows:
            w.writerow([_cell(row.get(f)) for f in fields])
    return path


def read_results_csv(path) -> list[dict]:
    """Read ``results.csv`` back (numbers as float, empty cells as ``None``)."""
    text_fields = ("train_bin", "test_bin", "test_kind")
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.append(
                {
                    k: (v if k in text_fields else (float(v) if v != "" else None))
                    for k, v in row.items()
                }
            )
    return out


def metric_matrix(rows: list[dict], plan: StudyPlan, metric: str) -> np.ndarray:
    """``[n_train, n_test]`` array of one metric (NaN where undefined)."""
    index = {(r["train_bin"], r["test_bin"]): r for r in rows}
    m = np.full((len(plan.train_bins), len(plan.test_bins)), np.nan)
    for i, b in enumerate(plan.train_bins):
        for j, t in enumerate(plan.test_bins):
            v = index.get((b.name, t.name), {}).get(metric)
            if v is not None:
                m[i, j] = v
    return m


def _figure(width: float, height: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(
    matrix,
    row_labels,
    col_labels,
    path,
    *,
    title: str,
    dpi: int = 100,
    n_sweep=None,
    low=None,
    high=None,
    xlabel: str = "test set",
    ylabel: str = "training bin",
    outline: bool = True,
) -> Path:
    """Annotated heatmap of a metric over training bins (rows) × test sets (columns).

    The best training bin of each test set is outlined; undefined cells show ``–``.

    Parameters
    ----------
    matrix : array_like, shape (n_train, n_test)
        Values in [0, 1]; NaN where undefined.
    row_labels, col_labels : sequence of str
    path : path-like
        Output PNG.
    title : str
    dpi : int
    n_sweep : int, optional
        Number of test-sweep columns; a line separates them from the extra sets after.
    low, high : array_like, optional
        Interval bounds of every cell, printed under the value.
    xlabel, ylabel : str
    outline : bool
        Outline the highest cell of each column.

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.patches import Rectangle

    m = np.asarray(matrix, dtype=np.float64)
    n_rows, n_cols = m.shape
    ci = low is not None and high is not None
    lo = np.asarray(low, dtype=np.float64) if ci else None
    hi = np.asarray(high, dtype=np.float64) if ci else None
    fig = _figure(2.2 + 1.2 * n_cols, 1.5 + (0.75 if ci else 0.5) * n_rows, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            v = m[i, j]
            text = "–" if np.isnan(v) else f"{v:.2f}"
            if ci and np.isfinite(v) and np.isfinite(lo[i, j]) and np.isfinite(hi[i, j]):
                text += f"\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            colour = "black" if np.isnan(v) or v > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8 if ci else 9, color=colour)
    for j in range(n_cols if outline else 0):
        col = m[:, j]
        if np.isfinite(col).any():
            i = int(np.nanargmax(col))
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
            )
    if n_sweep is not None and 0 < n_sweep < n_cols:
        ax.axvline(n_sweep - 0.5, color="white", linewidth=3)
    ax.set_xticks(range(n_cols), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(n_rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def noise_variable(bins) -> str | None:
    """The noise variable on the x axis: ``lambda`` if any bin varies λ, else ``sigma``."""
    for key in VARIABLES:
        if any(key in b.levels for b in bins):
            return key
    return None


def _x_positions(bins, variable: str) -> tuple[np.ndarray, list[str]]:
    """x of each test bin: the middle of its range; λ = 0 (no shot noise) at the far right."""
    mids = [float(np.mean(b.levels[variable])) for b in bins]
    none = [variable == "lambda" and b.levels[variable][1] == 0 for b in bins]
    finite = [m for m, n in zip(mids, none, strict=True) if not n]
    right = (max(finite) * 1.25 + 5.0) if finite else 1.0
    xs = np.array([right if n else m for m, n in zip(mids, none, strict=True)])
    labels = []
    for b, n in zip(bins, none, strict=True):
        lo, hi = b.levels[variable]
        labels.append("none" if n else (f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"))
    return xs, labels


def plot_lines(rows, plan: StudyPlan, path, *, variable: str, dpi: int = 100) -> Path:
    """Detection F1 and macro defect F1 against the test noise level, one line per model.

    Only test-sweep bins that vary ``variable`` are drawn (extra sets have no level).
    When the test sweep also varies the other variable, each of its levels gets its own
    line style.

    Returns
    -------
    pathlib.Path
    """
    tests = [t for t in plan.test_bins if t.kind == "sweep" and variable in t.levels]
    other = next((k for k in VARIABLES if k != variable), None)
    groups: dict = {}
    for t in tests:
        groups.setdefault(tuple(t.levels.get(other, ())), []).append(t)
    metrics = [("detection_f1", "detection F1")]
    if plan.defect_classes:
        metrics.append(("macro_defect_f1", "macro defect F1"))
    fig = _figure(5.2 * len(metrics) + 1.8, 4.0, dpi)
    index = {(r["train_bin"], r["test_bin"]): r for r in rows}
    styles = ["-", "--", ":", "-."]
    colours = [f"C{i % 10}" for i in range(len(plan.train_bins))]
    axes = [fig.add_subplot(1, len(metrics), k + 1) for k in range(len(metrics))]
    for ax, (metric, name) in zip(axes, metrics, strict=True):
        ticks: dict = {}
        for g, (level, group) in enumerate(groups.items()):
            xs, labels = _x_positions(group, variable)
            order = np.argsort(xs, kind="stable")
            ticks.update(zip(xs.tolist(), labels, strict=True))
            for i, b in enumerate(plan.train_bins):
                ys = [index.get((b.name, group[j].name), {}).get(metric) for j in order]
                ys = np.array([np.nan if y is None else y for y in ys], dtype=np.float64)
                suffix = ""
                if len(groups) > 1 and level:
                    suffix = f" @ {VARIABLES[other]} {level[0]:g}–{level[1]:g}"
                ax.plot(
                    xs[order],
                    ys,
                    styles[g % len(styles)],
                    marker="o",
                    color=colours[i],
                    label=(b.label + suffix) if g == 0 or suffix else None,
                )
        ax.set_xticks(list(ticks), list(ticks.values()))
        note = ", none = no shot noise" if variable == "lambda" else ""
        ax.set_xlabel(f"test {VARIABLES[variable]} (bin){note}")
        ax.set_ylabel(name)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    axes[-1].legend(title="training bin", fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cell_text(row: dict | None, metric: str) -> str:
    """``0.953 ± 0.012 [0.931, 0.970]``: mean over repeats, sd, interval over images."""
    if row is None or row.get(metric) is None:
        return "–"
    text = f"{row[metric]:.3f}"
    if row.get(f"{metric}_sd") is not None:
        text += f" ± {row[f'{metric}_sd']:.3f}"
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if lo is not None and hi is not None:
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def _table(rows, plan: StudyPlan, metric: str) -> list[str]:
    index = {(r["train_bin"], r["test_bin"]): r for r in rows}
    matrix = metric_matrix(rows, plan, metric)
    head = "| training bin \\ test | " + " | ".join(t.label for t in plan.test_bins) + " |"
    lines = [head, "|---" * (len(plan.test_bins) + 1) + "|"]
    best = [
        int(np.nanargmax(matrix[:, j])) if np.isfinite(matrix[:, j]).any() else -1
        for j in range(matrix.shape[1])
    ]
    for i, b in enumerate(plan.train_bins):
        cells = []
        for j, t in enumerate(plan.test_bins):
            text = _cell_text(index.get((b.name, t.name)), metric)
            cells.append(f"**{text}**" if best[j] == i else text)
        lines.append(f"| {b.label} | " + " | ".join(cells) + " |")
    return lines


def best_bins(rows, plan: StudyPlan, select_by: str, intervals=None) -> list[dict]:
    """Best training bin per test set (and over the mean of the test sweep's bins).

    The bin with the highest ``select_by`` (mean over repeats) wins, ties broken by
    detection F1; when ``select_by`` is undefined for a test set (no defect class with
    true columns), its detection F1 decides. With ``intervals``, the winner is compared
    with the runner-up by a paired bootstrap: the same image resamples for both, each
    bin's repeats resampled too (:meth:`StudyIntervals.between_seeds`); the winner is
    *separated* when the interval of the difference lies above 0.

    Parameters
    ----------
    rows : list of dict
        ``results.csv`` rows.
    plan : StudyPlan
    select_by : str
    intervals : StudyIntervals, optional

    Returns
    -------
    list of dict
        ``test`` (label), ``best`` (label), ``metric`` (used), ``value``, ``value_ci``
        (interval over test images, or ``None``), ``detection_f1``, ``runner_up`` (label
        or ``None``), ``runner_up_value``, ``margin`` (best − runner-up),
        ``margin_ci`` (paired interval of the difference, repeats resampled too, or
        ``None``), ``margin_ci_images`` (the same over test images only) and
        ``separated`` (``margin_ci`` above 0; ``None`` without intervals or runner-up).
    """
    det = metric_matrix(rows, plan, "detection_f1")
    sel = metric_matrix(rows, plan, select_by)
    columns = [(t.label, [j], sel[:, j], det[:, j]) for j, t in enumerate(plan.test_bins)]
    sweep = [j for j, t in enumerate(plan.test_bins) if t.kind == "sweep"]
    if len(sweep) > 1:
        columns.append(
            (
                "mean over the test sweep",
                sweep,
                _nanmean(sel[:, sweep], axis=1),
                _nanmean(det[:, sweep], axis=1),
            )
        )
    out = []
    for label, cols, s, d in columns:
        metric = select_by
        if not np.isfinite(s).any():
            s, metric = d, "detection_f1"
        if not np.isfinite(s).any():
            continue
        score = np.where(np.isfinite(s), s, -np.inf)
        tie = np.where(np.isfinite(d), d, -np.inf)
        order = np.lexsort((-tie, -score))
        i = int(order[0])
        j = int(order[1]) if len(order) > 1 and np.isfinite(score[order[1]]) else None
        entry = {
            "test": label,
            "best": plan.train_bins[i].label,
            "metric": metric,
            "value": float(s[i]),
            "value_ci": None,
            "detection_f1": float(d[i]) if np.isfinite(d[i]) else None,
            "runner_up": plan.train_bins[j].label if j is not None else None,
            "runner_up_value": float(s[j]) if j is not None else None,
            "margin": float(s[i] - s[j]) if j is not None else None,
            "margin_ci": None,
            "margin_ci_images": None,
            "separated": None,
        }
        if intervals is not None:
            tests = [plan.test_bins[c].name for c in cols]

            def resampled(b, how, tests=tests, metric=metric):
                name = plan.train_bins[b].name
                return _nanmean(np.stack([how(name, t, metric) for t in tests]), axis=0)

            entry["value_ci"] = intervals.interval(resampled(i, intervals.over_images))
            if j is not None:
                diff = resampled(i, intervals.between_seeds) - resampled(j, intervals.between_seeds)
                lo, hi = intervals.interval(diff)
                entry["margin_ci"] = (lo, hi)
                entry["separated"] = bool(lo > 0)
                images = resampled(i, intervals.over_images) - resampled(j, intervals.over_images)
                entry["margin_ci_images"] = intervals.interval(images)
        out.append(entry)
    return out


def verdict(entry: dict) -> str:
    """One sentence on a :func:`best_bins` entry: separated or "no clear winner"."""
    if entry["runner_up"] is None:
        return f"{entry['best']} (the only training bin)"
    lo_hi = entry["margin_ci"]
    diff = f"{entry['margin']:+.3f}"
    if lo_hi is not None:
        diff += f" [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]"
    if entry["separated"] is None:
        return f"{entry['best']}, ahead of {entry['runner_up']} by {diff} (no interval computed)"
    if entry["separated"]:
        return f"{entry['best']}, separated from {entry['runner_up']} (difference {diff})"
    return (
        f"no clear winner: {entry['best']} and {entry['runner_up']} are within the interval "
        f"(difference {diff})"
    )


def _level_key(b: NoiseBin, variable: str):
    return tuple(b.levels[variable]) if variable in b.levels else None


def _level_label(level, variable: str) -> str:
    lo, hi = level
    if variable == "lambda" and hi == 0:
        return "λ 0 (none)"
    symbol = VARIABLES[variable]
    return f"{symbol} {lo:g}" if lo == hi else f"{symbol} {lo:g}–{hi:g}"


def axis_matrix(rows, plan: StudyPlan, metric: str, variable: str):
    """A metric over training levels × test levels of one noise variable.

    Cells average (over repeats already, then) over the bins sharing a level: a training
    λ level averages the training bins of that λ at every σ, a test λ level the test
    bins of that λ at every σ. A training sweep that does not vary ``variable`` keeps
    one row per bin.

    Returns
    -------
    (ndarray, list of str, list of str)
        Matrix ``[train levels, test levels]`` and the row and column labels; ``None``
        when the test sweep does not vary ``variable``.
    """
    tests = [t for t in plan.test_bins if t.kind == "sweep" and variable in t.levels]
    if not tests:
        return None
    full = metric_matrix(rows, plan, metric)
    test_levels = list(dict.fromkeys(_level_key(t, variable) for t in tests))
    by_train = all(variable in b.levels for b in plan.train_bins)
    train_keys = [_level_key(b, variable) if by_train else b.name for b in plan.train_bins]
    train_levels = list(dict.fromkeys(train_keys))
    m = np.full((len(train_levels), len(test_levels)), np.nan)
    for a, tl in enumerate(train_levels):
        ri = [i for i, k in enumerate(train_keys) if k == tl]
        for c, sl in enumerate(test_levels):
            cj = [
                j
                for j, t in enumerate(plan.test_bins)
                if t in tests and _level_key(t, variable) == sl
            ]
            m[a, c] = _nanmean(full[np.ix_(ri, cj)].ravel(), axis=0)
    row_labels = [
        _level_label(k, variable) if by_train else plan.train_bins[train_keys.index(k)].label
        for k in train_levels
    ]
    return m, row_labels, [_level_label(k, variable) for k in test_levels]


def grid_matrix(rows, plan: StudyPlan, metric: str, intervals=None):
    """Each training bin's metric (mean over the test sweep) on the training λ × σ grid.

    Returns
    -------
    (ndarray, ndarray, ndarray, list of str, list of str) or None
        Values, interval bounds (NaN without ``intervals``), λ labels (rows), σ labels
        (columns); ``None`` unless every training bin has both a λ and a σ level.
    """
    if not all("lambda" in b.levels and "sigma" in b.levels for b in plan.train_bins):
        return None
    lams = list(dict.fromkeys(_level_key(b, "lambda") for b in plan.train_bins))
    sigs = list(dict.fromkeys(_level_key(b, "sigma") for b in plan.train_bins))
    full = metric_matrix(rows, plan, metric)
    sweep = [j for j, t in enumerate(plan.test_bins) if t.kind == "sweep"]
    m, lo, hi = (np.full((len(lams), len(sigs)), np.nan) for _ in range(3))
    for i, b in enumerate(plan.train_bins):
        r, c = lams.index(_level_key(b, "lambda")), sigs.index(_level_key(b, "sigma"))
        m[r, c] = _nanmean(full[i, sweep], axis=0)
        if intervals is not None:
            per = [intervals.over_images(b.name, plan.test_bins[j].name, metric) for j in sweep]
            lo[r, c], hi[r, c] = intervals.interval(_nanmean(np.stack(per), axis=0))
    return (
        m,
        lo,
        hi,
        [_level_label(k, "lambda") for k in lams],
        [_level_label(k, "sigma") for k in sigs],
    )


def write_report(result: StudyResult, config: NoiseStudyConfig) -> dict:
    """``results.csv``, ``repeats.csv``, the heatmaps, the line plot and ``summary.md``.

    Parameters
    ----------
    result : StudyResult
        With ``plan``, ``rows`` and ``repeat_rows`` filled in (``intervals`` optional).
    config : NoiseStudyConfig

    Returns
    -------
    dict
        Paths by name: ``results``, ``repeats``, ``summary``, ``heatmap_detection_f1``,
        ``heatmap_macro_defect_f1`` (when the scheme has defect classes), ``lines`` (when
        the test sweep has noise levels), ``heatmap_<variable>_<metric>`` per noise
        variable when the test sweep varies both λ and σ, and ``map_lambda_sigma_<metric>``
        when the training bins form a λ × σ grid.
    """
    plan, rows, out = result.plan, result.rows, result.out_dir
    dpi = config.report.dpi
    files = {"results": write_results_csv(rows, out / "results.csv")}
    if result.repeat_rows:
        files["repeats"] = write_results_csv(result.repeat_rows, out / "repeats.csv")
    n_sweep = sum(t.kind == "sweep" for t in plan.test_bins)
    row_labels = [b.label for b in plan.train_bins]
    col_labels = [t.label for t in plan.test_bins]
    metrics = [("detection_f1", "Column detection F1")]
    if plan.defect_classes:
        metrics.append(("macro_defect_f1", "Macro defect F1 (mean F1 over defect classes present)"))
    for metric, title in metrics:
        files[f"heatmap_{metric}"] = plot_heatmap(
            metric_matrix(rows, plan, metric),
            row_labels,
            col_labels,
            out / f"heatmap_{metric}.png",
            title=f"{title}; best training bin per test set outlined",
            dpi=dpi,
            n_sweep=n_sweep,
            low=metric_matrix(rows, plan, f"{metric}_ci_low"),
            high=metric_matrix(rows, plan, f"{metric}_ci_high"),
        )
    sweep_tests = [t for t in plan.test_bins if t.kind == "sweep"]
    variable = noise_variable(sweep_tests)
    if variable is not None:
        files["lines"] = plot_lines(
            rows, plan, out / f"f1_vs_{variable}.png", variable=variable, dpi=dpi
        )
    both = all(any(k in t.levels for t in sweep_tests) for k in VARIABLES)
    for key in VARIABLES if both else ():
        for metric, title in metrics:
            got = axis_matrix(rows, plan, metric, key)
            if got is None:
                continue
            m, rl, cl = got
            files[f"heatmap_{key}_{metric}"] = plot_heatmap(
                m,
                rl,
                cl,
                out / f"heatmap_{key}_{metric}.png",
                title=f"{title} by {VARIABLES[key]} (other axis averaged)",
                dpi=dpi,
                xlabel=f"test {VARIABLES[key]}",
                ylabel=f"training {VARIABLES[key]}",
            )
    for metric, title in metrics:
        got = grid_matrix(rows, plan, metric, result.intervals)
        if got is None:
            continue
        m, lo, hi, rl, cl = got
        files[f"map_lambda_sigma_{metric}"] = plot_heatmap(
            m,
            rl,
            cl,
            out / f"map_lambda_sigma_{metric}.png",
            title=f"{title}: mean over the test sweep per training λ × σ bin",
            dpi=dpi,
            low=lo,
            high=hi,
            xlabel="training σ",
            ylabel="training λ",
            outline=False,
        )
    summary = out / "summary.md"
    summary.write_text(_summary_markdown(result, config, files))
    files["summary"] = summary
    return files


def _summary_markdown(result, config, files) -> str:
    """``summary.md``: what was run, the best training bin per test set, the F1 tables."""
    plan, rows = result.plan, result.rows
    select_by = config.report.select_by if plan.defect_classes else "detection_f1"
    rep = config.report
    lines = [
        "# Noise study",
        "",
        f"- training sweep: `{config.train_sweep}` — {config.repeats} model(s) per bin: "
        + ", ".join(f"`{b.name}`" for b in plan.train_bins),
        f"- test sweep: `{config.test_sweep}` — "
        + ", ".join(f"`{t.name}`" for t in plan.test_bins if t.kind == "sweep"),
    ]
    for t in plan.test_bins:
        if t.kind == "extra":
            lines.append(f"- extra test set `{t.name}`: " + ", ".join(f"`{s}`" for s in t.stores))
    n_images = sorted({int(r["n_images"]) for r in rows})
    seeds = [config.train.seed + k * config.train.members for k in range(config.repeats)]
    lines += [
        f"- models: `models/<bin>/`, {config.train.epochs} epochs each, training seeds "
        + ", ".join(str(v) for v in seeds)
        + f", scored with `{config.evaluate.checkpoint}.pt`; test images per set: "
        + ", ".join(str(n) for n in n_images),
        "- macro defect F1: mean column F1 over "
        + (", ".join(f"`{c}`" for c in plan.defect_classes) or "(no defect class)")
        + ", over the classes with true columns in the test set",
    ]
    if result.intervals is not None:
        lines.append(
            f"- cells: mean over the {config.repeats} repeat(s)"
            + (" ± standard deviation between them" if config.repeats > 1 else "")
            + f", then the {rep.confidence:.0%} bootstrap interval over the test images "
            f"({rep.bootstrap} resamples of the images, each with all its columns; seed "
            f"{rep.bootstrap_seed})"
        )
        lines.append(
            "- a best bin is *separated* when the paired bootstrap interval of its difference "
            "from the runner-up (same image resamples for both"
            + (", each bin's repeats resampled too" if config.repeats > 1 else "")
            + ") lies above 0; otherwise: no clear winner"
            + (
                "; *over images only* keeps the repeats fixed: the part of the uncertainty "
                "that more test images would shrink"
                if config.repeats > 1
                else ""
            )
        )
    else:
        lines.append("- no intervals (`report.bootstrap: 0`)")
    entries = best_bins(rows, plan, select_by, result.intervals)
    lines += [
        "",
        "## Best training bin per test set",
        "",
        f"Chosen by {METRIC_NAMES[select_by]} (ties: detection F1).",
        "",
    ]
    mean = next((e for e in entries if e["test"] == "mean over the test sweep"), None)
    if mean is not None:
        lines += [f"**Over the test sweep: {verdict(mean)}.**", ""]
    lines += [
        "| test set | best training bin | score [interval] | runner-up | difference [paired "
        "interval] | over images only | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in entries:
        score = f"{b['value']:.3f}"
        if b["value_ci"] is not None:
            score += f" [{b['value_ci'][0]:.3f}, {b['value_ci'][1]:.3f}]"
        runner = f"{b['runner_up']} ({b['runner_up_value']:.3f})" if b["runner_up"] else "–"
        diff = "–" if b["margin"] is None else f"{b['margin']:+.3f}"
        if b["margin_ci"] is not None:
            diff += f" [{b['margin_ci'][0]:+.3f}, {b['margin_ci'][1]:+.3f}]"
        word = {True: "separated", False: "no clear winner", None: "–"}[b["separated"]]
        images = "–"
        if b["margin_ci_images"] is not None:
            images = f"[{b['margin_ci_images'][0]:+.3f}, {b['margin_ci_images'][1]:+.3f}]"
        lines.append(
            f"| {b['test']} | **{b['best']}** | {score} ({METRIC_NAMES[b['metric']]}) | "
            f"{runner} | {diff} | {images} | {word} |"
        )
    lines += ["", "## Detection F1 (best per column in bold)", ""]
    lines += [*_table(rows, plan, "detection_f1"), ""]
    if plan.defect_classes:
        lines += ["## Macro defect F1 (best per column in bold)", ""]
        lines += [*_table(rows, plan, "macro_defect_f1"), ""]
    lines += ["## Figures", ""]
    titles = {
        "heatmap_detection_f1": "detection F1",
        "heatmap_macro_defect_f1": "macro defect F1",
        "lines": "F1 against the test noise level",
    }
    for key, path in files.items():
        if key in titles or key.startswith(("heatmap_lambda", "heatmap_sigma", "map_lambda")):
            lines.append(f"![{titles.get(key, key.replace('_', ' '))}]({Path(path).name})")
    lines += [
        "",
        "Per-class F1 and intervals in `results.csv`, one row per model in `repeats.csv`; raw "
        f"scores in `evaluations/`. This run: {len(result.trained)} model(s) trained, "
        f"{len(result.reused_models)} reused; {len(result.evaluated)} evaluation(s) computed, "
        f"{len(result.reused_evaluations)} reused.",
        "",
    ]
    return "\n".join(lines)
