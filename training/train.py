"""Training: a :class:`Trainer` that receives model, optimiser and data; runs from a config.

:class:`Trainer` knows nothing about stores or configs: it steps an optimiser over batches
(``{"image", "mask", ...}`` dicts), validates, keeps the per-epoch history and saves
checkpoints. :func:`train_model` builds everything from a :class:`TrainConfig` (datasets,
U-Net, AdamW, schedule, loss) and hands it to a ``Trainer``; :func:`train_ensemble` does that
for N members with seeds ``seed, seed+1, ...`` (one after another, or one process per GPU).

Checkpoints (``last.pt`` every epoch, ``best.pt`` when the monitored validation metric
improves) hold the model, optimiser, scheduler and grad-scaler states, the torch, NumPy and
Python random states, the epoch, the history and the config, so a resumed run reproduces
the uninterrupted one bit for bit on CPU. They are plain ``torch.save`` dicts readable with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simgen.store import atomic_write
from training.config import EvalConfig, OptimConfig, TrainConfig, diff_configs
from training.data import build_datasets, class_frequencies, make_loaders
from training.losses import SegmentationLoss, class_weights_from_frequencies
from training.metrics import ColumnScores, find_columns
from training.models import build_model
from training.report import write_history_csv, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "simgen-train-checkpoint"
CHECKPOINT_VERSION = 1
NORMALIZATION = {"function": "training.augment.normalize_image", "percentiles": [1.0, 99.0]}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/``None``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a device.

    Raises
    ------
    ValueError
        When CUDA is asked for and not available.
    """
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for but CUDA is not available")
    return dev


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """Learning-rate schedule stepped once per batch.

    ``cosine``: linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to
    1 % of the peak; ``onecycle``: :class:`torch.optim.lr_scheduler.OneCycleLR` with
    ``pct_start = warmup_fraction`` (at least two steps; runs of fewer than 4 steps fall
    back to the cosine schedule); ``constant``: warm-up then constant.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    optim : OptimConfig
    total_steps : int
        Number of optimiser steps of the whole run.

    Returns
    -------
    torch.optim.lr_scheduler.LRScheduler
    """
    total = max(int(total_steps), 1)
    warm = int(round(optim.warmup_fraction * total))
    if optim.schedule == "onecycle" and total >= 4:
        # at least two warm-up steps: OneCycleLR divides by (pct_start · total − 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=optim.lr,
            total_steps=total,
            pct_start=min(0.5, max(optim.warmup_fraction, 2.0 / total)),
        )

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if optim.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(total - warm, 1))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def get_rng_state() -> dict:
    """torch (CPU and CUDA), NumPy (legacy global) and Python random states, as plain data."""
    # the legacy global NumPy state is saved on purpose: code we call may still use it
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - restoring the legacy global state on purpose
        (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(payload: dict, path) -> Path:
    """``torch.save`` to a temporary file, then rename (a crash never leaves half a file)."""
    return atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)


def load_checkpoint_dict(path, map_location="cpu") -> dict:
    """Load a checkpoint dict safely (``weights_only=True``) and check its format.

    Raises
    ------
    ValueError
        When the file is missing or not a simgen-train checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a simgen-train checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {ckpt.get('version')!r}; this code reads "
            f"{CHECKPOINT_VERSION}"
        )
    return ckpt


class Trainer:
    """Optimises a model on batches and validates it; saves resumable checkpoints.

    Parameters
    ----------
    model : torch.nn.Module
        Network returning logits ``[B, K, H, W]``.
    optimizer : torch.optim.Optimizer
    loss_fn : callable
        ``loss_fn(logits, mask) -> scalar``.
    train_loader : iterable of dict
        Batches with ``image`` ``[B, 1, H, W]`` and ``mask`` ``[B, H, W]``; when its
        ``sampler`` has ``set_epoch``, it is called before each epoch.
    val_loader : iterable of dict, optional
        Validation batches; with ``columns`` and ``pixel_size_A`` (per item) they are also
        scored at column level.
    scheduler : LRScheduler, optional
        Stepped after every optimiser step.
    device : str or torch.device
    amp : bool
        Mixed precision (bfloat16 where supported, else float16 with a grad scaler); only
        on CUDA.
    grad_clip : float
        Clip the gradient norm to this (0 = off).
    class_names : sequence of str, optional
        Needed for validation scores (index 0 = background).
    eval_cfg : EvalConfig, optional
        Column finding and matching settings for validation.
    progress : bool
        Show a tqdm bar per epoch.
    meta : dict, optional
        Extra entries stored in every checkpoint (config, label scheme, model spec...).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        loss_fn,
        train_loader,
        *,
        val_loader=None,
        scheduler=None,
        device="cpu",
        amp: bool = False,
        grad_clip: float = 0.0,
        class_names=None,
        eval_cfg=None,
        progress: bool = False,
        meta: dict | None = None,
    ):
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, nn.Module) else loss_fn
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.scheduler = scheduler
        self.grad_clip = float(grad_clip)
        self.class_names = list(class_names) if class_names is not None else None
        self.eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig()
        self.progress = progress
        self.meta = dict(meta or {})
        self.use_amp = bool(amp) and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.scaler = (
            torch.amp.GradScaler("cuda")
            if self.use_amp and self.amp_dtype == torch.float16
            else None
        )
        self.epoch = 0
        self.history: list[dict] = []
        self.best: float | None = None
        self.best_epoch: int | None = None

    # -- one epoch ---------------------------------------------------------------------
    def _autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_epoch(self) -> dict:
        """One pass over ``train_loader``; returns ``train_loss`` (mean) and ``lr`` (last)."""
        self.model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        bar = _progress(self.train_loader, self.progress, f"epoch {self.epoch + 1}")
        for batch in bar:
            images = batch["image"].to(self.device, non_blocking=True)
            masks = batch["mask"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images)
            loss = self.loss_fn(logits, masks)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                self._clip()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self._clip()
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            total += loss.detach().double() * images.shape[0]
            count += images.shape[0]
            if self.progress and count % (4 * images.shape[0]) == 0:
                bar.set_postfix(loss=f"{total.item() / count:.4f}")
        mean = total.item() / max(count, 1)
        if not math.isfinite(mean):
            raise FloatingPointError(
                f"training loss is {mean} in epoch {self.epoch + 1}; lower optim.lr or check "
                "the data"
            )
        return {"train_loss": mean, "lr": self.optimizer.param_groups[0]["lr"]}

    def _clip(self):
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation scores on ``val_loader``.

        Returns
        -------
        dict
            ``val_loss``; with class names, ``val_pixel_acc`` and ``val_miou`` (mean IoU of
            foreground classes); with true columns in the batches, column detection
            ``val_precision``, ``val_recall``, ``val_f1`` and ``val_macro_f1`` (mean
            per-class F1 over the classes present).
        """
        if self.val_loader is None:
            return {}
        self.model.eval()
        total, count = 0.0, 0
        scores = ColumnScores(self.class_names) if self.class_names else None
        ev = self.eval_cfg
        scored_columns = False
        for batch in self.val_loader:
            images = batch["image"].to(self.device)
            masks = batch["mask"].to(self.device)
            with self._autocast():
                logits = self.model(images)
            total += float(self.loss_fn(logits, masks)) * images.shape[0]
            count += images.shape[0]
            if scores is None:
                continue
            probs = logits.float().softmax(1).cpu().numpy()
            masks_np = batch["mask"].numpy()
            for j in range(len(probs)):
                scores.add_pixels(probs[j].argmax(0), masks_np[j])
                if "columns" not in batch:
                    continue
                scored_columns = True
                p = float(batch["pixel_size_A"][j])
                cols = find_columns(
                    probs[j],
                    threshold=ev.threshold,
                    min_area_px=ev.min_area_A2 / p**2,
                    min_distance_px=ev.min_separation_A / p or None,
                )
                scores.add_columns(
                    cols,
                    batch["columns"][j],
                    ev.radius_A / p,
                    shape=probs[j].shape[1:],
                    border_px=ev.border_A / p,
                )
        out = {"val_loss": total / max(count, 1)}
        if scores is not None:
            s = scores.summary()
            out["val_pixel_acc"] = s["pixel"]["accuracy"]
            out["val_miou"] = s["pixel"]["mean_iou_foreground"]
            if scored_columns:
                det = s["detection"]
                out["val_precision"] = det["precision"] or 0.0
                out["val_recall"] = det["recall"] or 0.0
                out["val_f1"] = det["f1"] or 0.0
                f1s = [c["f1"] or 0.0 for c in s["classes"].values() if c["support"]]
                out["val_macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
        return out

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: states, epoch, history, RNGs."""
        return {
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler else None,
            "scaler_state": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "history": [dict(r) for r in self.history],
            "best": self.best,
            "best_epoch": self.best_epoch,
            "rng": get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (RNG states included)."""
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.scheduler is not None and state.get("scheduler_state") is not None:
            self.scheduler.load_state_dict(state["scheduler_state"])
        if self.scaler is not None and state.get("scaler_state") is not None:
            self.scaler.load_state_dict(state["scaler_state"])
        self.epoch = int(state["epoch"])
        self.history = [dict(r) for r in state["history"]]
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        set_rng_state(state["rng"])

    def checkpoint(self) -> dict:
        """The dict saved to ``last.pt``/``best.pt``: format tag, :attr:`meta` and state."""
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **self.meta} | (
            self.state_dict()
        )

    # -- the loop ----------------------------------------------------------------------
    def fit(
        self,
        epochs: int,
        *,
        out_dir=None,
        monitor: str = "val_macro_f1",
        stop_after: int | None = None,
        val_every: int = 1,
    ) -> list[dict]:
        """Train from the current epoch up to ``epochs``.

        Parameters
        ----------
        epochs : int
            Total number of epochs of the run (epochs already done are skipped).
        out_dir : path-like, optional
            Where ``last.pt``, ``best.pt`` and ``history.csv`` go; nothing is written
            without it.
        monitor : {"val_loss", "val_f1", "val_macro_f1", "val_miou"}
            Metric choosing ``best.pt``; ``train_loss`` is used when there is no validation.
        stop_after : int, optional
            Return once this many epochs are done (the run can be resumed later).
        val_every : int
            Validate after every ``val_every``-th epoch and after the last one; ``best.pt``
            is only updated on validated epochs.

        Returns
        -------
        list of dict
            The history (one row per epoch).
        """
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        last_epoch = epochs if stop_after is None else min(epochs, stop_after)
        while self.epoch < last_epoch:
            t0 = time.perf_counter()
            row = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            if (self.epoch + 1) % val_every == 0 or self.epoch + 1 == epochs:
                row.update(self.validate())
            row["seconds"] = time.perf_counter() - t0
            self.epoch += 1
            self.history.append(row)
            value, key = _monitor_value(row, monitor, self.val_loader is not None)
            improved = value is not None and (
                self.best is None
                or (value < self.best if key.endswith("loss") else value > self.best)
            )
            if improved:
                self.best, self.best_epoch = value, self.epoch
            logger.info("%s", _summary_line(row, key))
            if out is not None:
                payload = self.checkpoint()
                save_checkpoint(payload, out / "last.pt")
                if improved:
                    save_checkpoint(payload, out / "best.pt")
                write_history_csv(self.history, out / "history.csv")
        return self.history


def _monitor_value(row: dict, monitor: str, has_val: bool):
    """(value, name) of the monitored metric; value None on a non-validated epoch."""
    if has_val:
        if row.get(monitor) is not None:
            return float(row[monitor]), monitor
        if "val_loss" in row:  # validated, but the metric is not available: fall back
            return float(row["val_loss"]), "val_loss"
        return None, monitor
    return float(row["train_loss"]), "train_loss"


def _summary_line(row: dict, key: str) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    for k in ("val_loss", "val_miou", "val_f1", "val_macro_f1"):
        if row.get(k) is not None:
            parts.append(f"{k} {row[k]:.4f}")
    parts.append(f"{row['seconds']:.1f} s")
    return "  ".join(parts)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


@dataclass(frozen=True)
class RunResult:
    """Outcome of one training run.

    Attributes
    ----------
    out_dir : pathlib.Path
        Run directory.
    last, best : pathlib.Path
        Checkpoints (``best`` is ``last`` of the best epoch).
    history : list of dict
        One row per epoch.
    finished : bool
        Whether all epochs are done (False after ``stop_after``).
    """

    out_dir: Path
    last: Path
    best: Path
    history: list
    finished: bool


def _class_weights(config: TrainConfig, train_ds, n_classes: int):
    lc = config.loss
    if lc.class_weights is not None:
        if len(lc.class_weights) != n_classes:
            raise ValueError(
                f"loss.class_weights: {len(lc.class_weights)} weights given for the "
                f"{n_classes} classes of the label scheme"
            )
        return np.asarray(lc.class_weights, dtype=np.float64)
    if lc.class_weight_power == 0:
        return None
    counts = class_frequencies(train_ds, n_classes)
    return class_weights_from_frequencies(counts, lc.class_weight_power, lc.max_class_weight)


# Kept as one function (~85 lines of code): the run's steps (resume checks, data, model,
# weights, checkpoint metadata, the trainer) in order; each is already a helper call.
#: File a run folder (single model or ensemble) carries from its first moment: what tells
#: ``train`` that a non-empty folder is its own (refused otherwise, untouched).
RUN_MARKER = ".simgen-run.json"


def is_run_folder(path) -> bool:
    """True when ``path`` is a folder ``train`` wrote (its marker, or for runs made before
    the marker: ``last.pt``, ``ensemble.json`` or ``config.yaml`` with ``history.csv``)."""
    p = Path(path)
    return p.is_dir() and (
        (p / RUN_MARKER).is_file()
        or (p / "last.pt").is_file()
        or (p / "ensemble.json").is_file()
        or ((p / "config.yaml").is_file() and (p / "history.csv").is_file())
    )


def claim_run_folder(out) -> Path:
    """Make ``out`` a run folder before anything is written into it: new, empty or one
    ``train`` wrote (else refused by name, untouched); writes :data:`RUN_MARKER`
    (:func:`training.report.claim_output_folder`).

    Raises
    ------
    ValueError
        ``out`` is a file, or a folder holding files that ``train`` did not write.
    """
    from training.report import claim_output_folder

    return claim_output_folder(
        out, tool="simgen-train train", marker=RUN_MARKER, is_ours=is_run_folder
    )


@contextlib.contextmanager
def _run_folder(out: Path):
    """Hold ``out`` for one writer and make sure it is a run folder (new, empty or ours).

    A second ``train`` into the same folder is told who holds it (pid, host, since); a folder
    of other files is refused by name, untouched; when a store turns out damaged before any
    checkpoint was written, a folder this call created is removed again, so a run folder is
    left only when there is a run to resume.
    """
    from simgen.store import WriterLock
    from training.stores import StoreError

    if out.is_file() or out.is_symlink():
        raise ValueError(f"--out: {out} is a file; choose a folder for the output of `train`")
    with WriterLock(out):
        created = not out.exists()
        claim_run_folder(out)
        try:
            yield
        except StoreError:
            if created and out.is_dir() and not any(out.rglob("last.pt")):
                import shutil

                shutil.rmtree(out)
            raise


def train_model(
    config: TrainConfig,
    out_dir,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> RunResult:
    """Train one network as ``config`` says and write its run directory.

    Builds the datasets (:func:`training.data.build_datasets`), the model
    (:func:`training.models.build_model`), AdamW, the schedule and the loss, and runs a
    :class:`Trainer`. Weight initialisation uses ``torch.manual_seed(config.seed)`` inside
    :func:`torch.random.fork_rng`, so the caller's global torch random state is left as it
    was.

    Parameters
    ----------
    config : TrainConfig
    out_dir : path-like
        Run directory: ``last.pt``, ``best.pt``, ``history.csv``, ``config.yaml``.
    resume : bool
        Continue from ``out_dir/last.pt`` (its config must equal ``config`` apart from the
        runtime fields ``device``, ``num_threads``, ``progress``, ``data.num_workers``).
    stop_after : int, optional
        Stop once this many epochs are done (resume later to finish).

    Returns
    -------
    RunResult

    Raises
    ------
    ValueError
        Bad config, a run directory that already holds a run (without ``resume``), a
        config that differs from the checkpoint's, or bad stores (:class:`StoreError`).
    """
    out = Path(out_dir)
    with _run_folder(out):
        return _train_model(config, out, resume, stop_after)


# Kept as one function (~85 lines of code): the run's steps (resume checks, data, model,
# weights, checkpoint metadata, the trainer) in order; each is already a helper call.
def _train_model(config: TrainConfig, out: Path, resume: bool, stop_after) -> RunResult:
    """:func:`train_model` under the run folder's lock."""
    last = out / "last.pt"
    state = None
    if last.exists():
        if not resume:
            raise ValueError(
                f"{out} already holds a run (last.pt); resume it or choose another directory"
            )
        state = load_checkpoint_dict(last)
        diff = diff_configs(TrainConfig.from_dict(state["config"]).math_dict(), config.math_dict())
        if diff:
            raise ValueError(
                f"config differs from the checkpoint's in {', '.join(diff)}; resume with the "
                f"same config (see {out / 'config.yaml'}) or start a new run directory"
            )
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    train_ds, val_ds = build_datasets(config.data, config.augment, config.seed, config.preprocess)
    scheme = train_ds.scheme
    n_classes = scheme.n_classes
    weights = _class_weights(config, train_ds, n_classes)
    model_kwargs = {
        "in_channels": 1,
        "n_classes": n_classes,
        "depth": config.model.depth,
        "width": config.model.width,
        "norm": config.model.norm,
        "dropout": config.model.dropout,
    }
    meta = {
        "config": config.to_dict(),
        "model": {"name": config.model.name, "kwargs": model_kwargs},
        "label_scheme": scheme.to_dict(),
        "class_names": scheme.class_names,
        "class_weights": None if weights is None else [float(w) for w in weights],
        "pixel_size_A": sorted({st.pixel_size_A for st in train_ds.stores}),
        "train_stores": [st.path for st in train_ds.stores],
        "normalization": NORMALIZATION,
    }
    (out / "config.yaml").write_text(config.to_yaml())
    trainer = _fit(
        config,
        out,
        device,
        state,
        model_kwargs,
        weights,
        scheme,
        meta,
        train_ds,
        val_ds,
        stop_after,
    )
    return RunResult(
        out_dir=out,
        last=last,
        best=out / "best.pt",
        history=trainer.history,
        finished=trainer.epoch >= config.epochs,
    )


def _fit(
    config, out, device, state, model_kwargs, weights, scheme, meta, train_ds, val_ds, stop_after
):
    """Build the model, optimiser and loaders and run :meth:`Trainer.fit`; the trainer."""
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        model = build_model(config.model.name, **model_kwargs)
        if config.init_from and state is None:  # finetune: start from trained weights
            start = load_checkpoint_dict(config.init_from[0])
            try:
                model.load_state_dict(start["model_state"])
            except (KeyError, RuntimeError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else "no weights"
                raise ValueError(
                    f"init_from: {config.init_from[0]} does not fit this network ({first})"
                ) from None
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        train_loader, val_loader = make_loaders(
            train_ds, val_ds, config.data, config.seed, pin_memory=device.type == "cuda"
        )
        scheduler = build_scheduler(optimizer, config.optim, len(train_loader) * config.epochs)
        trainer = Trainer(
            model,
            optimizer,
            SegmentationLoss(weights, config.loss.dice_weight),
            train_loader,
            val_loader=val_loader,
            scheduler=scheduler,
            device=device,
            amp=config.amp,
            grad_clip=config.optim.grad_clip,
            class_names=scheme.class_names,
            eval_cfg=config.evaluate,
            progress=config.progress,
            meta=meta,
        )
        if state is not None:
            trainer.load_state_dict(state)
            del state
        trainer.fit(
            config.epochs,
            out_dir=out,
            monitor=config.monitor,
            stop_after=stop_after,
            val_every=config.val_every,
        )
    return trainer


def member_config(config: TrainConfig, k: int, device: str | None = None) -> TrainConfig:
    """Config of ensemble member ``k``: seed ``config.seed + k``, ``members = 1``, and the
    ``k``-th (mod their number) of the ``init_from`` checkpoints."""
    changes = {"seed": config.seed + k, "members": 1}
    if config.init_from:
        changes["init_from"] = (config.init_from[k % len(config.init_from)],)
    if device is not None:
        changes["device"] = device
    return config.replace(**changes)


def _train_members(config_dict, out_dir, ks, device, resume, stop_after):
    config = TrainConfig.from_dict(config_dict)
    for k in ks:
        train_model(
            member_config(config, k, device),
            Path(out_dir) / f"member_{k:02d}",
            resume=resume,
            stop_after=stop_after,
        )


def train_ensemble(
    config: TrainConfig,
    out_dir,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> list[RunResult]:
    """Train ``config.members`` networks with seeds ``seed, seed+1, ...``.

    Members go to ``out_dir/member_KK``; ``out_dir/ensemble.json`` lists their ``best.pt``
    (what :func:`training.predict.resolve_checkpoints` reads). With several CUDA devices and
    ``device`` ``auto`` or ``cuda``, one process per GPU trains members ``g, g+G, ...``;
    otherwise members train one after another in this process.

    Parameters
    ----------
    config : TrainConfig
    out_dir : path-like
    resume : bool
        Resume every member that has a ``last.pt`` (finished members are left as they are).
    stop_after : int, optional
        Passed to each member's :func:`train_model`.

    Returns
    -------
    list of RunResult
        One per member (histories are read back from the checkpoints after parallel runs).
    """
    out = Path(out_dir)
    with _run_folder(out):
        return _train_ensemble(config, out, resume, stop_after)


def _train_ensemble(config, out, resume, stop_after):
    (out / "config.yaml").write_text(config.to_yaml())
    n = config.members
    n_gpu = torch.cuda.device_count() if config.device in ("auto", "cuda") else 0
    if n_gpu > 1 and n > 1:
        ctx = torch.multiprocessing.get_context("spawn")
        procs = []
        for g in range(min(n_gpu, n)):
            ks = list(range(g, n, n_gpu))
            p = ctx.Process(
                target=_train_members,
                args=(config.to_dict(), str(out), ks, f"cuda:{g}", resume, stop_after),
            )
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
        failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"ensemble training failed on GPU(s) {failed}")
        results = []
        for k in range(n):
            d = out / f"member_{k:02d}"
            ckpt = load_checkpoint_dict(d / "last.pt")
            results.append(
                RunResult(
                    d,
                    d / "last.pt",
                    d / "best.pt",
                    ckpt["history"],
                    ckpt["epoch"] >= config.epochs,
                )
            )
    else:
        results = [
            train_model(
                member_config(config, k),
                out / f"member_{k:02d}",
                resume=resume and (out / f"member_{k:02d}" / "last.pt").exists(),
                stop_after=stop_after,
            )
            for k in range(n)
        ]
    write_json(
        {
            "members": [f"member_{k:02d}/best.pt" for k in range(n)],
            "seeds": [config.seed + k for k in range(n)],
        },
        out / "ensemble.json",
    )
    return results
