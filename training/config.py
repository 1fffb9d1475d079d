"""Training settings: frozen, validated configs with an annotated YAML template.

:class:`TrainConfig` gathers everything one training run needs (data, augmentation,
model, loss, optimiser, schedule, run settings). It derives from
:class:`simgen.configbase.Config`, so it round-trips through plain dicts and YAML, refuses
unknown keys and validates every field on construction. The defaults are the small CPU
recipe of ``docs/training.md`` (U-Net depth 3, width 16, batches of 8 random 128² crops).

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from simgen.configbase import Config, check_pair, check_range, described

SCHEDULES = ("cosine", "onecycle", "constant")
MONITORS = ("val_loss", "val_f1", "val_macro_f1", "val_miou")
#: Fields that may change between a run and its resumption (they do not affect the maths).
RUNTIME_FIELDS = ("device", "num_threads", "progress", "data.num_workers")


@dataclass(frozen=True)
class DataConfig(Config):
    """Which stores and samples to train on, and how batches are drawn."""

    train_stores: tuple[str, ...] = described("Zarr stores to train on (paths).", factory=tuple)
    val_stores: tuple[str, ...] = described(
        "Separate validation stores; empty: split validation off the training stores.",
        factory=tuple,
    )
    val_fraction: float = described(
        "Fraction of each training store (its last samples by index) kept for validation.",
        0.1,
    )
    train_range: tuple[int, int] | None = described(
        "Explicit [start, stop) sample range of each training store; overrides val_fraction.",
        None,
    )
    val_range: tuple[int, int] | None = described(
        "Explicit [start, stop) sample range of each validation store (or training store).",
        None,
    )
    crop: int = described("Side of the random square training crops [px]; 0 = whole images.", 128)
    batch_size: int = described("Training batch size.", 8)
    samples_per_epoch: int = described(
        "Crops drawn per epoch; 0 = one per training sample.",
        0,
    )
    num_workers: int = described("DataLoader worker processes (0 = load in the main process).", 0)
    store_weights: tuple[float, ...] | None = described(
        "Share of the training draws from each training store (same order; normalised); "
        "null: every training sample equally likely. Mixes real (human-labelled) and "
        "simulated batches at a chosen ratio.",
        None,
    )

    def __post_init__(self):
        for name in ("train_stores", "val_stores"):
            if not all(isinstance(p, str) and p for p in getattr(self, name)):
                raise ValueError(f"{name}: expected a list of store paths")
        check_range("val_fraction", self.val_fraction, 0.0, 0.9)
        check_pair("train_range", self.train_range, integer=True, low=0)
        check_pair("val_range", self.val_range, integer=True, low=0)
        check_range("crop", self.crop, 0)
        if 0 < self.crop < 16:
            raise ValueError(f"crop: must be 0 (whole images) or >= 16 px, got {self.crop}")
        check_range("batch_size", self.batch_size, 1)
        check_range("samples_per_epoch", self.samples_per_epoch, 0)
        check_range("num_workers", self.num_workers, 0)
        if self.store_weights is not None:
            w = self.store_weights
            if not all(isinstance(v, int | float) and v >= 0 for v in w) or sum(w) <= 0:
                raise ValueError(
                    f"store_weights: expected weights >= 0 with a positive sum, got {w}"
                )
            if self.train_stores and len(w) != len(self.train_stores):
                raise ValueError(
                    f"store_weights: {len(w)} weight(s) for {len(self.train_stores)} training "
                    "store(s)"
                )


@dataclass(frozen=True)
class AugmentConfig(Config):
    """Augmentations applied to image and labels together (training only)."""

    dihedral: bool = described(
        "Random flips and 90° rotations (the 8 symmetries of a square).", True
    )
    scale: tuple[float, float] = described(
        "Range of a log-uniform factor multiplying the normalised image.", (0.8, 1.25)
    )
    offset: tuple[float, float] = described(
        "Range of a uniform offset added to the normalised image.", (-0.1, 0.1)
    )
    noise_std: float = described(
        "Largest std of extra Gaussian noise on the normalised image (drawn in [0, this]).",
        0.0,
    )

    def __post_init__(self):
        check_pair("scale", self.scale)
        if self.scale[0] <= 0:
            raise ValueError(f"scale: factors must be > 0, got {list(self.scale)}")
        check_pair("offset", self.offset)
        check_range("noise_std", self.noise_std, 0.0)


@dataclass(frozen=True)
class ModelConfig(Config):
    """Network architecture (see ``training.models``)."""

    name: str = described("Registered model name (see training.models.MODELS).", "unet")
    depth: int = described("Number of down-sampling steps of the U-Net.", 3)
    width: int = described("Channels of the first level; doubled at each level down.", 16)
    norm: str = described("Normalisation layer: batch, group or none.", "batch")
    dropout: float = described("Dropout probability at the bottleneck.", 0.0)

    def __post_init__(self):
        check_range("depth", self.depth, 1, 6)
        check_range("width", self.width, 1)
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"norm: expected batch, group or none, got {self.norm!r}")
        check_range("dropout", self.dropout, 0.0, 0.9)


@dataclass(frozen=True)
class PreprocessConfig(Config):
    """Image preprocessing before the normalisation (see ``training.preprocess``); the steps
    run in the order plane, lines, gaussian, equalize, clahe. Stored with the model:
    labelling and evaluation repeat it."""

    plane: bool = described("Subtract the least-squares plane a + b·x + c·y.", False)
    lines: str = described(
        "Flatten each scan line (row): none, median (subtract its median) or poly "
        "(subtract a polynomial of degree line_degree).",
        "none",
    )
    line_degree: int = described("Degree of the per-line polynomial (lines: poly).", 1)
    gaussian_sigma_A: float = described("σ of a Gaussian smoothing [Å]; 0 = none.", 0.0)
    equalize: bool = described(
        "Global histogram equalisation (rank transform): invariant to any monotonic change "
        "of the intensity scale (gain, offset, gamma, display stretch).",
        False,
    )
    clahe: bool = described("Contrast-limited adaptive histogram equalisation (skimage).", False)
    clahe_clip: float = described("CLAHE clip limit (0..1).", 0.01)
    clahe_kernel_A: float = described("CLAHE tile size [Å].", 20.0)

    def __post_init__(self):
        if self.lines not in ("none", "median", "poly"):
            raise ValueError(f"lines: expected none, median or poly, got {self.lines!r}")
        check_range("line_degree", self.line_degree, 0, 5)
        check_range("gaussian_sigma_A", self.gaussian_sigma_A, 0.0, 10.0)
        check_range("clahe_clip", self.clahe_clip, 0.0, 1.0, low_open=True)
        check_range("clahe_kernel_A", self.clahe_kernel_A, 0.0, low_open=True)

    @property
    def active(self) -> bool:
        """Whether any step is on."""
        return (
            self.plane
            or self.lines != "none"
            or self.gaussian_sigma_A > 0
            or self.equalize
            or self.clahe
        )


@dataclass(frozen=True)
class LossConfig(Config):
    """Cross-entropy with class weights plus soft Dice."""

    class_weights: tuple[float, ...] | None = described(
        "Explicit per-class cross-entropy weights (index = class id); null: from frequencies.",
        None,
    )
    class_weight_power: float = described(
        "Automatic weights ∝ frequency^-power (0 = unweighted, 0.5 = inverse sqrt).", 0.5
    )
    max_class_weight: float = described("Upper bound of automatic class weights.", 20.0)
    dice_weight: float = described("Weight of the soft Dice term (0 = cross-entropy only).", 1.0)

    def __post_init__(self):
        if self.class_weights is not None:
            if not self.class_weights or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and w >= 0
                for w in self.class_weights
            ):
                raise ValueError(
                    f"class_weights: expected non-negative numbers, got {self.class_weights!r}"
                )
        check_range("class_weight_power", self.class_weight_power, 0.0, 2.0)
        check_range("max_class_weight", self.max_class_weight, 1.0)
        check_range("dice_weight", self.dice_weight, 0.0)


@dataclass(frozen=True)
class OptimConfig(Config):
    """AdamW and its learning-rate schedule (stepped every batch)."""

    lr: float = described("Peak learning rate.", 3e-3)
    weight_decay: float = described("AdamW weight decay.", 1e-4)
    schedule: str = described("Learning-rate schedule: cosine, onecycle or constant.", "cosine")
    warmup_fraction: float = described(
        "Fraction of all steps spent warming up (cosine: linear ramp; onecycle: pct_start).",
        0.05,
    )
    grad_clip: float = described("Clip the gradient norm to this (0 = no clipping).", 1.0)

    def __post_init__(self):
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        check_range("warmup_fraction", self.warmup_fraction, 0.0, 0.5)
        check_range("grad_clip", self.grad_clip, 0.0)


@dataclass(frozen=True)
class EvalConfig(Config):
    """How columns are found in predictions and matched to the true ones."""

    radius_A: float = described(
        "A detection within this distance of a true column matches it [Å].", 0.6
    )
    threshold: float = described(
        "Foreground probability (1 − p_background) of a column pixel.", 0.5
    )
    min_area_A2: float = described("Smaller detected blobs are dropped [Å²].", 0.15)
    min_separation_A: float = described(
        "Blobs with peaks at least this far apart are split (watershed) [Å]; 0 = never split.",
        1.0,
    )
    border_A: float = described(
        "True columns closer than this to an image edge are not scored [Å].", 1.0
    )

    def __post_init__(self):
        check_range("radius_A", self.radius_A, 0.0, low_open=True)
        check_range("threshold", self.threshold, 0.0, 1.0)
        check_range("min_area_A2", self.min_area_A2, 0.0)
        check_range("min_separation_A", self.min_separation_A, 0.0)
        check_range("border_A", self.border_A, 0.0)


@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything one training run needs; defaults are the small CPU recipe."""

    seed: int = described("Seed of weights, crops, augmentation and shuffling.", 0)
    epochs: int = described("Number of epochs.", 40)
    val_every: int = described("Validate every this many epochs (and after the last one).", 2)
    monitor: str = described(
        "Validation metric choosing best.pt: val_loss (lower), val_f1 (column detection), "
        "val_macro_f1 (mean per-class column F1) or val_miou (higher).",
        "val_macro_f1",
    )
    members: int = described("Ensemble size: members trained with seeds seed, seed+1, ...", 1)
    device: str = described("auto, cpu, cuda or cuda:N (auto: cuda when available).", "auto")
    amp: bool = described("Mixed precision on CUDA (ignored on CPU).", True)
    num_threads: int = described("torch CPU threads (0 = leave torch's default).", 0)
    progress: bool = described("Show tqdm progress bars.", True)
    data: DataConfig = described("Stores, split and batches.", factory=DataConfig)
    augment: AugmentConfig = described("Training augmentations.", factory=AugmentConfig)
    preprocess: PreprocessConfig = described(
        "Image preprocessing before normalisation (STM: plane, lines, gaussian, clahe).",
        factory=PreprocessConfig,
    )
    model: ModelConfig = described("Network.", factory=ModelConfig)
    loss: LossConfig = described("Loss.", factory=LossConfig)
    optim: OptimConfig = described("Optimiser and schedule.", factory=OptimConfig)
    evaluate: EvalConfig = described(
        "Column finding and matching (validation, evaluate).", factory=EvalConfig
    )
    init_from: tuple[str, ...] = described(
        "Checkpoints whose weights start training (finetune); member k of an ensemble starts "
        "from entry k mod their number. Empty: random initialisation.",
        factory=tuple,
    )

    def __post_init__(self):
        check_range("epochs", self.epochs, 1)
        if not all(isinstance(p, str) and p for p in self.init_from):
            raise ValueError("init_from: expected a list of checkpoint paths")
        check_range("val_every", self.val_every, 1)
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor: expected one of {MONITORS}, got {self.monitor!r}")
        check_range("members", self.members, 1)
        if not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        check_range("num_threads", self.num_threads, 0)

    def math_dict(self) -> dict:
        """The settings that change results: :meth:`to_dict` without the runtime fields."""
        data = self.to_dict()
        for dotted in RUNTIME_FIELDS:
            node = data
            *parents, last = dotted.split(".")
            for key in parents:
                node = node[key]
            node.pop(last)
        return data


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts.

    Parameters
    ----------
    a, b : dict
        Plain nested config dicts (``Config.to_dict`` output).
    prefix : str
        Prefix of the keys (used in recursion).

    Returns
    -------
    list of str
        Sorted dotted keys present in one and not the other, or with different values.
    """
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{name}.")
        elif va != vb:
            out.append(name)
    return out


def _yaml_value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def annotated_yaml(config: Config | None = None, _indent: int = 0) -> str:
    """YAML text of a config with each field's help as a comment.

    Parameters
    ----------
    config : Config, optional
        The config to write; the default :class:`TrainConfig` when omitted.

    Returns
    -------
    str
        YAML that :meth:`TrainConfig.from_yaml` reads back to the same config.
    """
    config = TrainConfig() if config is None else config
    pad = " " * _indent
    lines = []
    if _indent == 0:
        lines += [
            "# simgen-train configuration (docs/training.md). Defaults: the small CPU recipe.",
            "# Any key may be left out; unknown keys are refused.",
        ]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        help_text = f.metadata.get("help", "")
        if isinstance(value, Config):
            lines.append(f"{pad}{f.name}:  # {help_text}")
            lines.append(annotated_yaml(value, _indent + 2))
            continue
        plain = list(value) if isinstance(value, tuple) else value
        lines.append(f"{pad}{f.name}: {_yaml_value(plain)}  # {help_text}")
    return "\n".join(lines) + ("\n" if _indent == 0 else "")
