"""``simgen-train``: train, evaluate and apply FCNs on simgen stores.

A thin Typer layer: each command parses its options, loads the config and calls one
library function. torch is imported inside the commands, so ``--help`` and ``config``
start fast. Bad input ends with a one-line ``error: ...`` on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from simgen.cli import version_callback

app = typer.Typer(
    name="simgen-train",
    help="Train fully convolutional networks on simgen stores, evaluate and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Write and check training configs (YAML).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=version_callback("simgen-train"),
            is_eager=True,
            help="Print the version.",
        ),
    ] = False,
):
    """Train fully convolutional networks on simgen stores, evaluate and predict."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _setup_logging() -> None:
    """The library logs through ``logging``: show the ``training`` loggers' INFO lines (one
    per epoch...) on stderr, above any progress bar."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("training")
    if not log.handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _clean_errors(fn):
    """Report ValueError/FileNotFoundError as one line and exit 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from tqdm.contrib.logging import logging_redirect_tqdm

        _setup_logging()
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger("training")]):
                return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FloatingPointError) as err:
            _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        except PermissionError as err:
            _fail(f"{err.filename or 'output'}: cannot write there (permission denied)")
        except OSError as err:  # a file where a folder is wanted, a full disk...
            _fail(f"{err.filename or 'output'}: {err.strerror or type(err).__name__}")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--range: expected START:STOP, got {text!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"--range: expected 0 <= START < STOP, got {text!r}")
    return a, b


def load_train_config(config: Path | None, overrides: list[str] | None = None, **direct):
    """TrainConfig from an optional YAML file, ``key.path=value`` overrides and options.

    Parameters
    ----------
    config : Path, optional
        YAML file (default config when omitted).
    overrides : list of str
        ``dotted.key=value`` strings; values are parsed as YAML.
    **direct
        Dotted keys set from command-line options (``None`` values are ignored).

    Returns
    -------
    TrainConfig
    """
    from training.config import TrainConfig

    return TrainConfig.load_with_overrides(config, overrides or (), direct)


# -- config ------------------------------------------------------------------------------
@config_app.command("init")
@_clean_errors
def config_init(
    path: Annotated[Path, typer.Argument(help="YAML file to write.")] = Path("train.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
):
    """Write the default config (the small CPU recipe) with a comment on every key."""
    from training.config import annotated_yaml

    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite")
    path.write_text(annotated_yaml())
    typer.echo(f"wrote {path}")


@config_app.command("check")
@_clean_errors
def config_check(
    path: Annotated[Path, typer.Argument(help="YAML config to validate.")],
):
    """Validate a config file and print it with every default filled in."""
    from training.config import TrainConfig

    typer.echo(TrainConfig.load(path).to_yaml(), nl=False)


# -- train -------------------------------------------------------------------------------
@app.command()
@_clean_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (see `config init`).")
    ] = None,
    store: Annotated[
        list[str] | None,
        typer.Option("--store", "-s", help="Training store (repeat); replaces data.train_stores."),
    ] = None,
    val_store: Annotated[
        list[str] | None,
        typer.Option("--val-store", help="Validation store (repeat); replaces data.val_stores."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: dotted.key=value (repeat)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override epochs.")] = None,
    members: Annotated[int | None, typer.Option(help="Ensemble size (override).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option(help="Stop after this many epochs (resume later).")
    ] = None,
    real: Annotated[
        list[Path] | None,
        typer.Option(
            "--real",
            help="Human labels to mix in (repeat): a label folder corrected with `review`, or "
            "images with NAME.csv points / NAME_mask.* masks.",
        ),
    ] = None,
    real_fraction: Annotated[
        float, typer.Option(help="Share of training draws from --real (0..1).")
    ] = 0.5,
    preprocess: Annotated[
        str | None,
        typer.Option(
            help="Preprocess images (stored with the model): plane,lines=median|polyN,"
            "gauss=σÅ,equalize,clahe[=clip]; runs in that order."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Train a network (or an ensemble) on stores; writes checkpoints and history.csv."""
    from training.preprocess import parse_preprocess

    cfg = load_train_config(
        config,
        set_,
        **{
            "data.train_stores": store or None,
            "data.val_stores": val_store or None,
            "epochs": epochs,
            "members": members,
            "device": device,
            "progress": False if quiet else None,
            **{f"preprocess.{k}": v for k, v in parse_preprocess(preprocess).items()},
        },
    )
    from training.train import train_ensemble, train_model

    if real:
        from training.finetune import HUMAN_STORE, human_store_for, mix_config

        if resume and (out / HUMAN_STORE).exists():
            human = out / HUMAN_STORE
        else:
            if not cfg.data.train_stores:
                raise ValueError("--real: give the simulated stores too (--store)")
            human = human_store_for(real, out, cfg.data.train_stores)
        cfg = mix_config(cfg, human, real_fraction)
    if cfg.members > 1:
        results = train_ensemble(cfg, out, resume=resume, stop_after=stop_after)
    else:
        results = [train_model(cfg, out, resume=resume, stop_after=stop_after)]
    _report_runs(results)


def _report_runs(results) -> None:
    for r in results:
        last = r.history[-1] if r.history else {}
        state = "done" if r.finished else "stopped (resume with --resume)"
        score = ", ".join(
            f"{k} {last[k]:.4f}"
            for k in ("train_loss", "val_loss", "val_f1", "val_macro_f1")
            if last.get(k) is not None
        )
        typer.echo(f"{r.out_dir}: {state}; epoch {len(r.history)}; {score}")


# -- finetune ----------------------------------------------------------------------------
@app.command()
@_clean_errors
def finetune(
    run: Annotated[Path, typer.Argument(help="Checkpoint, run directory or ensemble to continue.")],
    corrected: Annotated[
        list[Path],
        typer.Option(
            "--corrected",
            help="Human labels (repeat): a label folder corrected with `review` (its reviewed "
            "images), or images with NAME.csv points / NAME_mask.* masks.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New run directory.")],
    store: Annotated[
        list[str] | None,
        typer.Option("--store", "-s", help="Simulated stores to mix in (default: the run's)."),
    ] = None,
    real_fraction: Annotated[
        float, typer.Option(help="Share of training draws from the human labels (0..1).")
    ] = 0.5,
    members: Annotated[
        int | None, typer.Option(help="Ensemble size (default: the run's members).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the run's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the run's).")] = None,
    all_images: Annotated[
        bool,
        typer.Option("--all-images", help="Also take images of the label folder not reviewed."),
    ] = False,
    pixel_size: Annotated[
        float | None,
        typer.Option("--pixel-size", help="[Å/px] of images labelled elsewhere without one."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: dotted.key=value (repeat)."),
    ] = None,
    preprocess: Annotated[
        str | None,
        typer.Option(
            help="Change the run's preprocessing: "
            "plane,lines=median|polyN,gauss=σÅ,equalize,clahe[=clip] (`none`: off)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Continue a trained model on human-corrected labels mixed with simulated stores."""
    from simgen.configbase import parse_overrides
    from training.finetune import finetune as run_finetune
    from training.preprocess import parse_preprocess

    overrides = parse_overrides(set_ or [])
    overrides.update(
        {
            "epochs": epochs,
            "optim.lr": lr,
            "device": device,
            "progress": False if quiet else None,
            **{f"preprocess.{k}": v for k, v in parse_preprocess(preprocess).items()},
        }
    )
    results = run_finetune(
        run,
        corrected,
        out,
        stores=store or None,
        real_fraction=real_fraction,
        members=members,
        overrides=overrides,
        reviewed_only=not all_images,
        pixel_size_A=pixel_size,
    )
    _report_runs(results)


# -- adapt -------------------------------------------------------------------------------
@app.command()
@_clean_errors
def adapt(
    run: Annotated[Path, typer.Argument(help="Checkpoint, run directory or ensemble to adapt.")],
    images: Annotated[
        list[str], typer.Argument(help="Unlabelled real images: files, folders or glob patterns.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder: the adapted model.")],
    material: Annotated[
        str | None,
        typer.Option("--material", "-m", help="E.g. WSe2: FFT pixel-size calibration."),
    ] = None,
    pixel_size: Annotated[
        float | None, typer.Option("--pixel-size", help="[Å/px] for files without one.")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Label → pseudo-label → train rounds.")] = 2,
    min_probability: Annotated[
        float, typer.Option(help="A site keeps its class from this probability on.")
    ] = 0.9,
    min_kept: Annotated[
        float, typer.Option(help="An image joins a round with this fraction of sites labelled.")
    ] = 0.5,
    real_fraction: Annotated[
        float, typer.Option(help="Share of training draws from the real images (0..1).")
    ] = 0.3,
    epochs: Annotated[int, typer.Option(help="Training epochs per round.")] = 4,
    lr_scale: Annotated[
        float, typer.Option(help="Learning rate of the rounds / the run's learning rate.")
    ] = 0.1,
    store: Annotated[
        list[str] | None,
        typer.Option("--store", "-s", help="Simulated stores to mix in (default: the run's)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a training config key: dotted.key=value (repeat)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Self-train a model on unlabelled real images: confident, lattice-consistent sites
    become pseudo-labels, mixed with simulated batches, for a few rounds. Prints the
    quality figures and the simulated held-out F1 before and after (exit 1 when that F1
    drops by more than 0.5 %)."""
    from simgen.configbase import parse_overrides
    from training.adapt import AdaptSettings
    from training.adapt import adapt as run_adapt

    settings = AdaptSettings(
        rounds=rounds, min_probability=min_probability, min_kept=min_kept,
        real_fraction=real_fraction, epochs=epochs, lr_scale=lr_scale,
    )  # fmt: skip
    overrides = parse_overrides(set_ or [])
    if quiet:
        overrides["progress"] = False
    report = run_adapt(
        run, images, out, settings=settings, stores=store or None, material=material,
        pixel_size_A=pixel_size, progress=not quiet, echo=typer.echo, overrides=overrides,
        device=device,
    )  # fmt: skip
    typer.echo(f"adapted model: {out} (report {out / 'adapt.json'})")
    if not report.f1_ok:
        typer.echo(
            f"error: the simulated held-out macro F1 dropped by {report.f1_drop:.4f} "
            f"(> {settings.max_f1_loss}); keep the original model or adapt more gently "
            "(--real-fraction, --epochs, --min-probability)",
            err=True,
        )
        raise typer.Exit(1)


# -- evaluate ----------------------------------------------------------------------------
@app.command()
@_clean_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="Checkpoint, run directory or ensemble directory.")],
    stores: Annotated[list[Path], typer.Argument(help="Labelled store(s) to score on.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for metrics.json, confusion.png.")
    ] = None,
    sample_range: Annotated[
        str | None, typer.Option("--range", help="Samples START:STOP of each store.")
    ] = None,
    radius: Annotated[
        float | None, typer.Option(help="Matching radius [Å] (default: the model's).")
    ] = None,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Greedy matching instead of Hungarian.")
    ] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the 8 flips/rotations.")] = False,
    tile: Annotated[
        int, typer.Option(help="Largest inference tile side [px] (tiles are spread evenly).")
    ] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Column detection and classification scores of a model on labelled stores."""
    from training.evaluate import evaluate_stores

    result = evaluate_stores(
        model,
        stores,
        out_dir=out,
        eval_overrides={"radius_A": radius} if radius is not None else None,
        sample_range=_parse_range(sample_range),
        device=device,
        tile=tile,
        tta=tta,
        method="greedy" if greedy else "hungarian",
        progress=not quiet,
    )
    det = result["detection"]
    typer.echo(
        f"{result['n_images']} images: detection precision {det['precision'] or 0:.4f} "
        f"recall {det['recall'] or 0:.4f} F1 {det['f1'] or 0:.4f}"
    )

    def num(v):
        return "  n/a" if v is None else f"{v:.3f}"

    for name, c in result["classes"].items():
        if c["support"] or c["fp"]:
            typer.echo(
                f"  {name:>14}: support {c['support']:6d}  precision {num(c['precision'])}"
                f"  recall {num(c['recall'])}  F1 {num(c['f1'])}  AP {num(c.get('ap'))}"
                f"  AUROC {num(c.get('auroc'))}"
            )
    if result.get("mean_ap") is not None:
        typer.echo(f"  mAP (classes present) {result['mean_ap']:.4f}")
    rel = result.get("reliability")
    if rel and rel.get("spearman") is not None:
        typer.echo(
            f"  reliability: class error rate {rel['error_rate'][0]:.3f} in the least and "
            f"{rel['error_rate'][-1]:.3f} in the most uncertain tenth of matched columns "
            f"(Spearman {rel['spearman']:.2f}; {rel['uncertainty']})"
        )
    if out is not None:
        names = ("metrics.json", "confusion.png", "reliability.png")
        typer.echo("wrote " + ", ".join(str(out / n) for n in names if (out / n).exists()))


# -- predict -----------------------------------------------------------------------------
@app.command()
@_clean_errors
def predict(
    model: Annotated[Path, typer.Argument(help="Checkpoint, run directory or ensemble directory.")],
    store: Annotated[Path, typer.Argument(help="Store whose images to label.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output Zarr directory (new).")],
    sample_range: Annotated[
        str | None, typer.Option("--range", help="Samples START:STOP (default: all).")
    ] = None,
    probabilities: Annotated[
        bool,
        typer.Option("--probabilities", help="Also store probabilities (and ensemble variance)."),
    ] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the 8 flips/rotations.")] = False,
    tile: Annotated[
        int, typer.Option(help="Largest inference tile side [px] (tiles are spread evenly).")
    ] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Label the images of a store: class maps, detected columns (and probabilities)."""
    import numpy as np

    from training.predict import predict_store

    span = _parse_range(sample_range)
    indices = None
    if span is not None:
        from training.stores import open_store

        st = open_store(store)
        indices = st.complete_indices(*span)
        if not len(indices):
            raise ValueError(f"--range {sample_range}: no complete sample in {store}")
        indices = np.asarray(indices)
    path = predict_store(
        model,
        store,
        out,
        indices=indices,
        save_probabilities=probabilities,
        device=device,
        tile=tile,
        tta=tta,
        progress=not quiet,
    )
    typer.echo(f"wrote {path}")


# -- noise-study -------------------------------------------------------------------------
@app.command("noise-study")
@_clean_errors
def noise_study(
    train_sweep: Annotated[
        Path | None,
        typer.Argument(help="Training sweep directory (`simgen sweep`); or train_sweep in -c."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Study directory; re-running it does only missing work."),
    ] = None,
    test_sweep: Annotated[
        Path | None,
        typer.Option("--test", help="Paired test sweep directory (made with another --seed)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Study YAML (see --write-config).")
    ] = None,
    extra_store: Annotated[
        list[str] | None,
        typer.Option(
            "--extra-store",
            help="Extra labelled test store, or folder of stores (repeat); replaces extra_stores.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a study key: dotted.key=value, e.g. train.epochs=10."),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(help="Models per training bin (training seeds differ); mean ± sd reported."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    write_config: Annotated[
        Path | None,
        typer.Option("--write-config", help="Write the resolved study config (YAML) and exit."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Noise study: models per training-noise bin, scored on a paired test sweep, with
    bootstrap intervals."""
    from training.noise_study import load_study_config, run_noise_study, study_yaml

    cfg = load_study_config(
        config,
        set_,
        **{
            "train_sweep": str(train_sweep) if train_sweep is not None else None,
            "test_sweep": str(test_sweep) if test_sweep is not None else None,
            "extra_stores": extra_store or None,
            "repeats": repeats,
            "train.device": device,
            "train.progress": False if quiet else None,
        },
    )
    if write_config is not None:
        write_config.write_text(study_yaml(cfg))
        typer.echo(f"wrote {write_config}")
        return
    if out is None:
        raise ValueError("--out: give the study directory")
    result = run_noise_study(cfg, out)  # steps go to the "training" logger (stderr)
    typer.echo(
        f"{len(result.trained)} model(s) trained, {len(result.reused_models)} reused; "
        f"{len(result.evaluated)} evaluation(s) computed, {len(result.reused_evaluations)} reused"
    )
    for name, path in result.files.items():
        typer.echo(f"  {name}: {path}")


# -- label -------------------------------------------------------------------------------
@app.command(
    help="Label experimental images: columns, sublattices, classes, vacancies, concentrations."
    "\n\nWrites columns.csv, summary.json, overlay.png, class_averages.png and "
    "defect_density.png into OUT/<image>/ (a subfolder per frame of a stack), OUT/summary.csv "
    "over all images "
    "and OUT/failures.txt. A file that cannot be labelled is reported on one line and the "
    "others go on; the exit code is 1 when any failed."
)
@_clean_errors
def label(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files (.dm3 .dm4 .emd .ser .tif .mrc .npy .png), glob patterns or "
            "folders (searched recursively).",
            show_default=False,
        ),
    ],
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint, run directory or ensemble.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one per image).")],
    pixel_size: Annotated[
        float | None,
        typer.Option("--pixel-size", help="Pixel size [Å] for files without a calibration."),
    ] = None,
    material: Annotated[
        str | None,
        typer.Option(
            help="Material (e.g. WSe2): FFT lattice calibration (pixel size of uncalibrated "
            "files, scan anisotropy and shear, a check of the file's calibration); lattice "
            "constant of the summary."
        ),
    ] = None,
    sum_frames: Annotated[
        bool, typer.Option("--sum-frames", help="Label the sum of a stack, not each frame.")
    ] = False,
    calibrate: Annotated[
        str,
        typer.Option(
            help="Pixel size: 'auto' (file, else --pixel-size, else FFT), 'fft' (the FFT's "
            "even when the file has one; needs --material) or 'file' (no FFT)."
        ),
    ] = "auto",
    correct_distortion: Annotated[
        bool,
        typer.Option(
            "--correct-distortion/--no-correct-distortion",
            help="Remove the scan anisotropy and shear the FFT measured before labelling.",
        ),
    ] = True,
    tile: Annotated[
        int,
        typer.Option(
            help="Largest inference tile side in px (at the model's pixel size; spread evenly)."
        ),
    ] = 512,
    overlap: Annotated[int, typer.Option(help="Overlap of neighbouring tiles in px.")] = 64,
    tta: Annotated[
        bool, typer.Option("--tta/--no-tta", help="Average the 8 flips/rotations (8× the cost).")
    ] = True,
    background: Annotated[
        bool,
        typer.Option("--background", help="Subtract a wide Gaussian blur before labelling."),
    ] = False,
    background_sigma: Annotated[
        float, typer.Option(help="σ of the background blur in Å (with --background).")
    ] = 3.0,
    preprocess: Annotated[
        str | None,
        typer.Option(
            help="Preprocessing instead of the model's (default: the model's own, as trained): "
            "plane,lines=median|polyN,gauss=σÅ,equalize,clahe[=clip]."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Label experimental images with a trained model (``experiments.label.label_files``)."""
    from training.experiments.label import label_files

    run = label_files(
        inputs,
        model,
        out,
        pixel_size_A=pixel_size,
        material=material,
        sum_frames=sum_frames,
        calibrate=calibrate,
        device=device,
        progress=not quiet,
        correct_distortion=correct_distortion,
        tile=tile,
        overlap=overlap,
        tta=tta,
        background_removal=background,
        background_sigma_A=background_sigma,
        preprocess=preprocess,
    )
    typer.echo(
        f"labelled {len(run.labelled)} image(s), {run.n_columns} columns; "
        f"{len(run.failures)} failed; wrote {out / 'summary.csv'}"
    )
    if run.failures:
        typer.echo(
            f"error: {len(run.failures)} input(s) failed, see {out / 'failures.txt'}", err=True
        )
        raise typer.Exit(1)


# -- review ------------------------------------------------------------------------------
@app.command(
    help="Review and correct a label output folder in the browser (a local web app)."
    "\n\nServes LABELLED (made by `simgen-train label`) at http://HOST:PORT/ until Ctrl-C. "
    "Saving writes corrections.csv, columns_corrected.csv and summary_corrected.json beside "
    "each image's originals (never over them) and LABELLED/summary_corrected.csv; opening the "
    "folder again resumes from corrections.csv."
)
@_clean_errors
def review(
    labelled: Annotated[
        Path, typer.Argument(help="Output folder of `simgen-train label`.", show_default=False)
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8765,
    open_browser: Annotated[
        bool, typer.Option("--open/--no-open", help="Open the page in the default browser.")
    ] = False,
):
    """Serve the review app over a label folder (``experiments.review_app``)."""
    from training.experiments.review_app import PortInUse, create_app, make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    if not 0 <= port <= 65535:
        raise ValueError(f"--port: expected 0..65535, got {port}")
    app_ = create_app(labelled)
    try:
        server = make_server(app_, host, port)
    except PortInUse:
        raise ValueError(
            f"--port {port}: already in use on {host}; choose another (--port 0 takes any free one)"
        ) from None
    url = f"http://{host}:{server.socket.getsockname()[1]}/"
    n = len(app_.config["REVIEWS"])
    typer.echo(f"reviewing {n} image(s) of {labelled} at {url} (Ctrl-C to stop)")
    sys.stdout.flush()
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the way to stop a server: not an error
        unsaved = [name for name, rv in app_.config["REVIEWS"].items() if rv.dirty]
        typer.echo(
            f"stopped; unsaved edits lost in {', '.join(unsaved)}" if unsaved else "stopped",
            err=True,
        )
    finally:
        server.server_close()


@app.command(
    help="Dynamics of an image stack: register the frames, track the columns onto lattice "
    "sites, find events (vacancies appearing, disappearing, hopping; dopants moving), score "
    "each site's instability (intensity and a convolutional autoencoder trained on the "
    "stack's own patches), map the density of unstable sites and test whether the vacancies "
    "the beam created cluster."
    "\n\nWrites tracks.csv, events.csv, sites.csv, instability_map.png, latent.png, "
    "stack.gif and summary.json into OUT (all or nothing)."
)
@_clean_errors
def dynamics(
    stack: Annotated[
        Path,
        typer.Argument(
            help="A stack file (.dm3 .dm4 .emd .tif ...), a folder of frames, or a simgen "
            "movie store (*.zarr).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", "-m", help="Trained run/checkpoint: its columns replace peak finding."
        ),
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option("--pixel-size", help="Pixel size [Å] for files without a calibration."),
    ] = None,
    material: Annotated[
        str | None,
        typer.Option(
            help="Material (e.g. MoS2): its lattice constant; FFT pixel-size calibration."
        ),
    ] = None,
    lattice_constant: Annotated[
        float, typer.Option(help="Lattice constant a [Å] when no --material is given.")
    ] = 3.16,
    seed: Annotated[int, typer.Option(help="Seed of the autoencoder and the CSR draws.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Analyse the dynamics of a stack (``training.dynamics.analyse_stack``)."""
    from training.dynamics import DynamicsSettings, analyse_stack, read_stack, write_outputs
    from training.dynamics.analysis import check_output

    check_output(out)
    st = read_stack(stack, pixel_size_A=pixel_size, material=material)
    settings = DynamicsSettings(lattice_constant_A=lattice_constant, seed=seed)
    result = analyse_stack(
        st.frames, st.pixel_size_A, settings, model=model, material=material, progress=not quiet
    )
    write_outputs(result, out, source=str(stack))
    ev = result.summary["events"]
    c = result.clustering
    typer.echo(
        f"{stack}: {result.summary['n_frames']} frames, {result.summary['n_sites']} sites, "
        f"{sum(ev.values())} events, {result.summary['n_unstable_sites']} unstable sites; "
        f"created vacancies clustered: {c.get('clustered', False)} (Ripley test p = "
        f"{c.get('p_clustered', float('nan')):.3f}, Clark-Evans R = "
        f"{c.get('clark_evans_R', float('nan')):.2f}); wrote {out}"
    )


def main() -> None:  # pragma: no cover - console entry convenience
    """Run the app (``python -m training.cli``)."""
    app(prog_name="simgen-train")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
