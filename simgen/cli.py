"""The ``simgen`` command line: thin wrappers that parse, load the config and call the
library. Heavy imports stay inside the commands so ``simgen --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Simulated, labelled HAADF-STEM datasets of 2D TMD monolayers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Dataset configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def version_callback(program: str = ""):
    """A ``--version`` callback printing simgen's version (and ``program`` in brackets);
    both CLIs use it."""

    def show(value: bool) -> None:
        if value:
            from importlib.metadata import version

            typer.echo(f"simgen {version('simgen')}" + (f" ({program})" if program else ""))
            raise typer.Exit()

    return show


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback(), is_eager=True, help="Print the version."
        ),
    ] = False,
):
    """Simulated, labelled HAADF-STEM datasets of 2D TMD monolayers."""


class Model(StrEnum):
    auto = "auto"
    incoherent = "incoherent"
    pointsum = "pointsum"
    prism = "prism"
    multislice = "multislice"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class ClusterKind(StrEnum):
    local = "local"
    slurm = "slurm"
    pbs = "pbs"
    cuda = "cuda"
    none = "none"


#: Exit codes of both CLIs (docs/cli.md): bad input or a failed check, a command-line
#: usage error (Typer's own), interrupted by Ctrl-C.
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def fail(message: str, code: int = EXIT_ERROR):
    """Print a one-line error and exit non-zero."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_range(text: str, name: str) -> tuple[float, float]:
    """``"5-20"`` -> (5, 20); ``"7"`` -> (7, 7)."""
    try:
        parts = [float(p) for p in text.split("-")] if "-" in text.strip("-") else [float(text)]
    except ValueError:
        fail(f"{name}: expected a number or a range like 5-20, got {text!r}")
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
        fail(f"{name}: expected a range LOW-HIGH with 0 <= LOW <= HIGH, got {text!r}")
    return parts[0], parts[1]


def build_config(
    config: Path | None,
    overrides: list[str] | None = None,
    **named,
):
    """Load the config file (or the default), apply named options and --set overrides."""
    from simgen.config import load_config
    from simgen.configbase import parse_overrides

    try:
        cfg = load_config(config)
        changes = {k: v for k, v in named.items() if v is not None}
        changes.update(parse_overrides(overrides))
        return cfg.with_overrides(changes) if changes else cfg
    except ValueError as err:
        fail(str(err))


def _setup_logging(verbose: bool):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # dask.distributed logs every worker start/stop at INFO
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.ERROR)


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: shipped default)")
]
DEFAULT_MAX_DISK = "200GB"
MaxDiskOpt = Annotated[
    str, typer.Option(help="Refuse a store estimated larger than this (e.g. 200GB, 2TB)")
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(help="Refuse when one worker would need more (default: this machine's RAM)"),
]
YesOpt = Annotated[
    bool, typer.Option("--yes", "-y", help="Go on beyond --max-disk/--max-memory/free space")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field, e.g. --set optics.semiangle_mrad=25"),
]


@config_app.command("init")
def config_init(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write")] = Path(
        "simgen.yaml"
    ),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file")] = False,
):
    """Write the annotated default dataset config."""
    from simgen.config import DEFAULT_CONFIG_FILE

    if output.exists() and not force:
        fail(f"{output} exists; use --force to overwrite")
    output.write_text(DEFAULT_CONFIG_FILE.read_text())
    typer.echo(f"wrote {output}")


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: SetOpt = None):
    """Print the full, validated config (defaults filled in)."""
    cfg = build_config(config, overrides)
    typer.echo(cfg.to_yaml())


def _calibration_for(cfg) -> dict | None:
    """Load the cached calibration the incoherent model needs, or compute and cache it."""
    from simgen.api import calibration_for

    return calibration_for(cfg, announce=lambda message: typer.echo(message, err=True))


@app.command()
def generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Store to write (*.zarr)")] = Path(
        "data/default.zarr"
    ),
    config: ConfigOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of samples")] = None,
    seed: Annotated[int | None, typer.Option(help="Dataset seed")] = None,
    size: Annotated[int | None, typer.Option(help="Image size in px (square)")] = None,
    model: Annotated[Model | None, typer.Option(help="Image model")] = None,
    device: Annotated[Device | None, typer.Option(help="cpu, gpu or auto")] = None,
    structure: Annotated[
        Path | None, typer.Option(help="Simulate this cell (any ASE format) instead of the builder")
    ] = None,
    noise_lambda: Annotated[
        str | None, typer.Option(help="Poisson λ (counts/px at the mean), e.g. 10 or 5-20")
    ] = None,
    overrides: SetOpt = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes / batch jobs")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Join a running dask scheduler (tcp://host:8786)")
    ] = None,
    cluster: Annotated[ClusterKind, typer.Option(help="Where tasks run")] = ClusterKind.local,
    jobqueue: Annotated[
        list[str] | None,
        typer.Option(
            help="slurm/pbs job setting over jobqueue.yaml, e.g. --jobqueue queue=short "
            "--jobqueue memory=4GB --jobqueue walltime=04:00:00 (partition= is queue=)"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store")] = False,
    max_disk: MaxDiskOpt = DEFAULT_MAX_DISK,
    max_memory: MaxMemoryOpt = None,
    yes: YesOpt = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
):
    """Generate a labelled dataset (resumes an interrupted store of the same config).

    Before any work it estimates the store's size on disk and the memory of one worker, and
    refuses beyond --max-disk (or the free space) and --max-memory unless --yes."""
    _setup_logging(verbose)
    named = {
        "dataset.n_samples": n,
        "dataset.seed": seed,
        "dataset.image_size": [size, size] if size else None,
        "simulation.model": model.value if model else None,
        "simulation.device": device.value if device else None,
        "structure.file": str(structure) if structure else None,
    }
    if noise_lambda is not None:
        lo, hi = _parse_range(noise_lambda, "--noise-lambda")
        named["acquisition.shot.lambda_counts"] = lo if lo == hi else {"uniform": [lo, hi]}
    job = _parse_jobqueue(jobqueue, cluster)
    cfg = build_config(config, overrides, **named)
    limits = None if yes else _limits(max_disk, max_memory)
    _run_generate(
        cfg, output, workers, scheduler, cluster, overwrite, verbose=verbose, job=job, limits=limits
    )


def _parse_jobqueue(items: list[str] | None, cluster: ClusterKind) -> dict:
    """``["queue=short", "memory=4GB"]`` -> dask-jobqueue keyword arguments."""
    if items and cluster not in (ClusterKind.slurm, ClusterKind.pbs):
        fail(f"--jobqueue applies to --cluster slurm or pbs, not {cluster.value}")
    job = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--jobqueue expects KEY=VALUE (e.g. queue=short), got {item!r}")
        key = key.strip().replace("-", "_")
        # walltime verbatim: YAML would read 30:00 as the number 1800
        if key == "walltime":
            job[key] = value.strip()
            continue
        import yaml

        try:
            job["queue" if key == "partition" else key] = yaml.safe_load(value)
        except yaml.YAMLError:
            fail(f"--jobqueue {key}: value is not valid YAML: {value!r}")
    return job


def _limits(max_disk: str, max_memory: str | None) -> dict:
    """``--max-disk``/``--max-memory`` in bytes (memory default: this machine's RAM)."""
    import os

    from simgen.cost import parse_bytes

    try:
        disk = parse_bytes(max_disk, "--max-disk")
        if max_memory is None:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        else:
            memory = parse_bytes(max_memory, "--max-memory")
    except ValueError as err:
        fail(str(err))
    return {"max_disk": disk, "max_memory": memory}


def _check_cost(cfg, output: Path, limits: dict | None) -> None:
    """Refuse a dataset beyond the limits before any work (nothing when --yes)."""
    from simgen import store
    from simgen.cost import check_limits, estimate_cost

    if limits is None:
        return
    est = estimate_cost(cfg)
    if output.exists() and store.is_simgen_store(output):
        return  # resuming (or replacing) a store that already passed
    check_limits(est, free_disk=store.free_space(output), **limits)


def _run_generate(
    cfg,
    output,
    workers,
    scheduler,
    cluster,
    overwrite,
    calibration="auto",
    verbose=False,
    job=None,
    limits=None,
):
    from simgen.cluster import ClusterSpec
    from simgen.generation import generate as run
    from simgen.pipeline import check_ready
    from simgen.store import StoreError

    try:
        check_ready(cfg)
        if overwrite:  # refuse a target that is not ours before any work
            from simgen.store import check_replaceable

            check_replaceable(output)
        _check_cost(cfg, Path(output), limits)
        cal = _calibration_for(cfg) if calibration == "auto" else calibration
        spec = ClusterSpec(
            kind=cluster.value,
            workers=workers,
            scheduler=scheduler,
            jobqueue=job or {},
            quiet=not verbose,
        )
        report = run(cfg, output, cluster=spec, overwrite=overwrite, calibration=cal)
    except KeyboardInterrupt:
        fail(
            f"interrupted; {output} keeps every finished sample: run the same command again "
            "to resume",
            code=EXIT_INTERRUPTED,
        )
    except PermissionError as err:
        fail(f"{output}: cannot write there ({err.strerror or err})")
    except (ValueError, StoreError, RuntimeError, FileNotFoundError, OSError) as err:
        fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    typer.echo(
        f"{report.path}: {report.computed} samples computed, {report.skipped} already complete; "
        f"{report.samples_per_second:.2f} samples/s"
    )
    return report


@app.command()
def movie(
    output: Annotated[Path, typer.Option("-o", "--output", help="Store to write (*.zarr)")] = Path(
        "data/movie.zarr"
    ),
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML movie config (default: shipped movie default)"),
    ] = None,
    frames: Annotated[int | None, typer.Option("--frames", help="Number of frames")] = None,
    seed: Annotated[int | None, typer.Option(help="Movie seed")] = None,
    size: Annotated[int | None, typer.Option(help="Frame size in px (square)")] = None,
    mode: Annotated[
        str | None, typer.Option(help="Where events happen: clustered or random")
    ] = None,
    model: Annotated[Model | None, typer.Option(help="Image model")] = None,
    device: Annotated[Device | None, typer.Option(help="cpu, gpu or auto")] = None,
    overrides: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
):
    """Image stack of one structure evolving under the beam (vacancies created, hopping,
    agglomerating; dopants moving; stage drift), with per-frame labels and the event table.
    Resumes an interrupted store of the same config."""
    from simgen.configbase import parse_overrides
    from simgen.movie import generate_movie, load_movie_config
    from simgen.store import StoreError, check_replaceable

    _setup_logging(verbose)
    named = {
        "dataset.n_samples": frames,
        "dataset.seed": seed,
        "dataset.image_size": [size, size] if size else None,
        "dynamics.mode": mode,
        "simulation.model": model.value if model else None,
        "simulation.device": device.value if device else None,
    }
    try:
        cfg = load_movie_config(config)
        changes = {k: v for k, v in named.items() if v is not None}
        changes.update(parse_overrides(overrides))
        cfg = cfg.with_overrides(changes) if changes else cfg
        if cfg.dataset.n_samples < 2:
            raise ValueError(
                f"--frames: a movie needs at least 2 frames, got {cfg.dataset.n_samples}"
            )
        if overwrite:
            check_replaceable(output)
        cal = _calibration_for(cfg)
        report = generate_movie(cfg, output, calibration=cal, overwrite=overwrite)
    except KeyboardInterrupt:
        fail(
            f"interrupted; {output} keeps every finished frame: run the same command again "
            "to resume",
            code=EXIT_INTERRUPTED,
        )
    except PermissionError as err:
        fail(f"{output}: cannot write there ({err.strerror or err})")
    except (ValueError, StoreError, RuntimeError, OSError) as err:
        fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    typer.echo(
        f"{report.path}: {report.computed} frames computed, {report.skipped} already complete; "
        f"{report.n_events} events"
    )


@app.command()
def sweep(
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory of stores")] = Path(
        "data/sweep"
    ),
    noise_lambda: Annotated[
        str | None, typer.Option(help="Poisson λ range, e.g. 5-20 (counts/px at the mean)")
    ] = None,
    gaussian_sigma: Annotated[
        str | None, typer.Option(help="Gaussian read-noise σ range (relative), e.g. 0-0.1")
    ] = None,
    points: Annotated[int | None, typer.Option(help="K evenly spaced fixed values")] = None,
    bins: Annotated[
        str | None, typer.Option(help="Bins, e.g. 0,5-20,20-40,40-80 (uniform within a bin)")
    ] = None,
    sigma_points: Annotated[
        int | None, typer.Option(help="σ levels of a λ × σ grid: K evenly spaced values")
    ] = None,
    sigma_bins: Annotated[
        str | None, typer.Option(help="σ bins of a λ × σ grid, e.g. 0,0.02-0.05,0.05-0.1")
    ] = None,
    config: ConfigOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per store")] = None,
    target_ci: Annotated[
        float | None,
        typer.Option(
            help="Size each store for this 95 % interval half-width of the macro defect F1, "
            "from the defect columns per image (--n then caps it)"
        ),
    ] = None,
    planning_f1: Annotated[
        float, typer.Option(help="F1 assumed by --target-ci (the spread is largest at 0.5)")
    ] = 0.9,
    seed: Annotated[int | None, typer.Option(help="Dataset seed (shared: paired design)")] = None,
    size: Annotated[int | None, typer.Option(help="Image size in px (square)")] = None,
    overrides: SetOpt = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Join a running dask scheduler")] = None,
    cluster: Annotated[ClusterKind, typer.Option(help="Where tasks run")] = ClusterKind.local,
    overwrite: Annotated[bool, typer.Option(help="Replace existing stores")] = False,
    max_disk: MaxDiskOpt = DEFAULT_MAX_DISK,
    max_memory: MaxMemoryOpt = None,
    yes: YesOpt = False,
):
    """Noise sweep: one store per noise level, same structures and optics (paired)."""
    from simgen.sweep import plan_sweep, write_manifest

    if noise_lambda is None and gaussian_sigma is None:
        fail("give --noise-lambda and/or --gaussian-sigma")
    base = build_config(
        config,
        overrides,
        **{
            "dataset.n_samples": n,
            "dataset.seed": seed,
            "dataset.image_size": [size, size] if size else None,
        },
    )
    try:
        plan = plan_sweep(
            base,
            noise_lambda=noise_lambda,
            gaussian_sigma=gaussian_sigma,
            points=points,
            bins=bins,
            sigma_points=sigma_points,
            sigma_bins=sigma_bins,
        )
    except ValueError as err:
        fail(str(err))
    if target_ci is not None:
        plan = _size_for_interval(plan, base, target_ci, planning_f1, cap=n)
    output.mkdir(parents=True, exist_ok=True)
    calibration = _calibration_for(base)
    for entry in plan:
        typer.echo(f"== {entry.name}")
        _run_generate(
            entry.config,
            output / f"{entry.name}.zarr",
            workers,
            scheduler,
            cluster,
            overwrite,
            calibration=calibration,
            limits=None if yes else _limits(max_disk, max_memory),
        )
    write_manifest(output, plan)
    typer.echo(f"sweep of {len(plan)} stores in {output} (manifest: {output / 'sweep.json'})")


def _size_for_interval(plan, base, half_width: float, planning_f1: float, cap=None):
    """The sweep's entries with ``dataset.n_samples`` set by :func:`images_for_interval`
    (at most ``cap`` images, when given: ``--n`` with ``--target-ci`` is a budget)."""
    from simgen.sweep import images_for_interval, scored_columns_per_image
    from structures import defect_classes, get_scheme

    try:
        per_image = scored_columns_per_image(base)
        defects = defect_classes(get_scheme(base.labels.scheme).names)
        rates = {c: m for c, m in per_image.items() if c in defects}
        n_images, one = images_for_interval(half_width, rates, f1=planning_f1)
    except ValueError as err:
        fail(str(err))
    counts = ", ".join(f"{m:.2f} {c}" for c, m in rates.items())
    text = (
        f"--target-ci {half_width:g}: {counts} per image (32 pilot structures); at F1 "
        f"{planning_f1:g} one image gives ±{one:.3f}, so {n_images} images per store"
    )
    if cap is not None and cap < n_images:
        n_images = cap
        text += f"; capped by --n at {cap} (about ±{one / cap**0.5:.3f})"
    typer.echo(text)
    return [
        replace(e, config=e.config.with_overrides({"dataset.n_samples": n_images})) for e in plan
    ]


@app.command()
def inspect(
    store_path: Annotated[Path, typer.Argument(help="Dataset store (*.zarr)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
):
    """Summarise a store: samples, completion, class frequencies, parameter ranges."""
    from simgen import store

    try:
        root = store.open_store(store_path)
        info = store.summary(root)
    except store.StoreError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    h, w = info["image_shape"]
    typer.echo(
        f"{store_path}: {info['completed']}/{info['n_samples']} samples complete, "
        f"{h}x{w} px at {info['pixel_size_A']} Å/px, scheme {info['label_scheme']}"
    )
    typer.echo("columns per class:")
    for name, count in info["columns_per_class"].items():
        typer.echo(f"  {name:<14} {count}")
    typer.echo("drawn parameters (min .. max):")
    for name, (lo, hi) in info["params"].items():
        typer.echo(f"  {name:<32} {lo:.4g} .. {hi:.4g}")


@app.command()
def preview(
    store_path: Annotated[Path, typer.Argument(help="Dataset store (*.zarr)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write")] = Path(
        "preview.png"
    ),
    count: Annotated[int, typer.Option("--count", help="Samples in the montage")] = 6,
):
    """Montage of images with their label overlays and a legend."""
    from simgen import store
    from simgen.preview import store_preview

    try:
        root = store.open_store(store_path)
        store_preview(root, output, count=count)
    except (store.StoreError, ValueError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"{output}: cannot write there ({err.strerror or type(err).__name__})")
    typer.echo(f"wrote {output}")


@app.command("structure")
def structure_cmd(
    material: Annotated[str, typer.Argument(help="e.g. MoS2, WSe2")] = "MoS2",
    output: Annotated[Path, typer.Option("-o", "--output", help="File (any ASE format)")] = Path(
        "cell.xyz"
    ),
    fov: Annotated[float, typer.Option(help="Field of view (square) in Å")] = 50.0,
    rotation: Annotated[float, typer.Option(help="In-plane rotation in degrees")] = 0.0,
    defect: Annotated[
        list[str] | None, typer.Option(help="KIND=CONCENTRATION, e.g. vac_X1=0.05 (repeatable)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    columns_csv: Annotated[
        Path | None, typer.Option("--columns", help="Also write the column table as CSV")
    ] = None,
):
    """Build a defective monolayer and export it with ASE (plus its column table)."""
    import ase.io

    from structures import apply_defects, build_monolayer, column_table

    try:
        ml = build_monolayer(material, fov=fov, rotation_deg=rotation, rng=seed)
        spec = {}
        for item in defect or []:
            if "=" not in item:
                fail(f"--defect expects KIND=CONCENTRATION, got {item!r}")
            kind, value = item.split("=", 1)
            spec[kind.strip()] = float(value)
        if spec:
            ml = apply_defects(ml, spec, rng=seed + 1)
        table = column_table(ml)
        ase.io.write(output, ml.atoms)
    except ValueError as err:
        fail(str(err))
    if columns_csv is not None:
        import csv

        records = table.to_records()
        with open(columns_csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    counts = table.count_defects()
    typer.echo(
        f"wrote {output}: {len(ml.atoms)} atoms, {int(table.in_fov.sum())} columns in the "
        f"field of view, defects {counts or 'none'}"
    )


@app.command()
def calibrate(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Recompute even when cached")] = False,
):
    """Calibrate the incoherent model against PRISM for the config's optics and elements
    (cached; `generate` does this by itself when needed)."""
    from simgen import store
    from simgen.api import cached_calibration
    from simgen.pipeline import calibration_request

    cfg = build_config(config, overrides, **{"simulation.model": "incoherent"})
    key, compute = calibration_request(cfg)
    try:
        data = cached_calibration(
            key, compute, force=force, announce=lambda message: typer.echo(message, err=True)
        )
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    cache_file = store.calibration_cache_file(key)
    where = f"cached at {cache_file}" if cache_file.is_file() else "shipped with simgen"
    typer.echo(f"calibration {key}\n  {where}")
    if data.get("kind") == "detector_grid":
        from simgen.calibration_table import shipped_keys

        nodes = data["calibrations"]
        shipped = len(set(shipped_keys()) & {node.get("key") for node in nodes})
        origin = f"; {shipped} of them shipped with simgen" if shipped else ""
        typer.echo(f"  detector grid of {len(nodes)} calibrations{origin} (inner, outer mrad):")
        for node in nodes:
            weights = ", ".join(f"{e} {w:.5f}" for e, w in node["weights_A2"].items())
            typer.echo(
                f"  {node['haadf_inner_mrad']:g}-{node['haadf_outer_mrad']:g}: weights_A2 "
                f"{weights}; fit r {node['fit'].get('correlation', float('nan')):.5f}"
            )
        return
    for name in ("weights_A2", "widths_A", "kappa", "background", "fit"):
        if name in data:
            typer.echo(f"  {name}: {json.dumps(data[name], default=float)[:300]}")


@app.command()
def match(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Experimental images (.dm3 .dm4 .emd .ser .tif .mrc .npy .png), folders or globs"
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Matched config (YAML) to write")
    ] = Path("matched.yaml"),
    material: Annotated[
        str | None,
        typer.Option("--material", "-m", help="E.g. WSe2 (default: the config's material)"),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    pixel_size: Annotated[
        float | None,
        typer.Option("--pixel-size", help="Pixel size [Å/px] for files without one"),
    ] = None,
    frame: Annotated[int | None, typer.Option("--frame", help="Only this frame of a stack")] = None,
    sum_frames: Annotated[
        bool, typer.Option("--sum-frames", help="Match a stack's sum, not each frame")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="PNG: image beside the matched simulation")
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Simulated images per refinement round")
    ] = 6,
):
    """Estimate the acquisition from experimental images (pixel size, distortion, noise,
    resolution, contrast, contamination, line jitter, export clipping) and write a config
    whose distributions are centred on it: `simgen generate -c matched.yaml` then makes
    training data that look like that microscope."""
    import io
    import math

    from simgen import store
    from simgen.api import cached_calibration
    from simgen.experiment.readers import ReaderError, expand_inputs, read_image
    from simgen.incoherent import DetectorGrid, calibration_from_dict
    from simgen.match import (
        MatchError,
        combined_config,
        describe,
        match_images,
        measure_tiles,
        report_figure,
        summary_table,
    )
    from simgen.pipeline import calibration_request

    cfg = build_config(config, overrides)
    if material is None:
        material = cfg.structure.material.to_config()
        if not isinstance(material, str):
            fail("--material: the config draws several materials; name the image's one")
        typer.echo(f"material: {material} (from the config; --material to change)", err=True)
    for path in (output, report):
        if path is not None and path.is_dir():
            fail(f"{path}: is a folder; give a file name")
        if path is not None and not path.resolve().parent.is_dir():
            fail(f"{path}: its folder does not exist")
    files, missing = expand_inputs(images)
    for text, why in missing:
        fail(f"{text}: {why}")
    measured, sites_of, source_of = {}, {}, {}
    names = [f.name for f in files]
    for path in files:
        base_name = path.name if names.count(path.name) == 1 else str(path)
        try:
            frames = read_image(
                path, material=material, pixel_size_A=pixel_size, frame=frame, sum_frames=sum_frames
            )
        except (ReaderError, ValueError) as err:
            typer.secho(f"skipped {base_name}: {err}", fg=typer.colors.YELLOW, err=True)
            continue
        for image in frames:
            name = base_name if len(frames) == 1 else f"{base_name}[{image.frame}]"
            try:
                figures, sites = measure_tiles(
                    image.data, image.pixel_size_A, material, cfg.dataset.image_size
                )
            except MatchError as err:
                typer.secho(f"skipped {name}: {err}", fg=typer.colors.YELLOW, err=True)
                continue
            lat = image.lattice
            distortion = (lat.anisotropy, lat.shear) if lat is not None else (math.nan,) * 2
            measured[name] = (figures, *distortion)
            sites_of[name], source_of[name] = sites, (path, image.frame)
            typer.echo(
                f"measured {name}: {image.pixel_size_A:.4f} Å/px ({image.pixel_size_source}), "
                f"contrast {figures.contrast:.3f}, noise {figures.noise_level:.3f}",
                err=True,
            )
    if not measured:
        fail("no image could be measured (see the messages above)")
    grid_cfg = cfg.with_overrides(
        {
            "structure.material": material,
            "simulation.model": "incoherent",
            "optics.haadf_inner_mrad": {"uniform": [40.0, 120.0]},
            "optics.haadf_outer_mrad": {"uniform": [150.0, 250.0]},
        }
    )
    try:
        key, compute = calibration_request(grid_cfg)
        grid = calibration_from_dict(
            cached_calibration(key, compute, announce=lambda m: typer.echo(m, err=True))
        )
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    if not isinstance(grid, DetectorGrid):
        fail("the calibration for the detector-angle sweep is not a detector grid")
    try:
        results = match_images(
            measured,
            cfg,
            grid,
            material=material,
            n_check=samples,
            progress=lambda m: typer.echo(m, err=True),
        )
        if not results:
            fail("no image could be matched (see the messages above)")
        matched_cfg = combined_config(cfg, material, results)
    except (MatchError, ValueError) as err:
        fail(str(err))
    first = next(iter(results))
    text = describe(results[first]) if len(results) == 1 else summary_table(results)
    typer.echo(text)
    lines = [
        f"simgen match: {len(results)} image(s) of {material}; generate with",
        f"  simgen generate -c {output} -o data/matched.zarr",
        "",
        *text.splitlines(),
    ]
    header = "".join(f"# {line}\n" for line in lines)
    png = None
    if report is not None:  # drawn before anything is written: no half output
        path, index = source_of[first]  # read again: no image kept in memory meanwhile
        again = read_image(
            path,
            material=material,
            pixel_size_A=pixel_size,
            frame=index,
            sum_frames=sum_frames and index is None,
        )[0]
        fig = report_figure(
            results[first], again.data, sites_of[first], title=f"simgen match: {first}"
        )
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        png = buf.getvalue()
    try:
        store.atomic_write(output, header + matched_cfg.to_yaml())
        typer.echo(f"wrote {output}")
        if png is not None:
            store.atomic_write(report, png, binary=True)
            typer.echo(f"wrote {report}")
    except OSError as err:
        fail(f"cannot write the output ({err.strerror or type(err).__name__}: {err.filename})")


@app.command()
def check(
    store_path: Annotated[Path, typer.Argument(help="Dataset store (*.zarr)")],
    index: Annotated[list[int] | None, typer.Option("--index", "-i", help="Samples")] = None,
    integrity: Annotated[
        bool,
        typer.Option(
            "--integrity",
            help="Verify every chunk of every complete sample (checksum, presence); mark "
            "damaged samples incomplete so that resuming the store recomputes them",
        ),
    ] = False,
):
    """Recompute samples from the store's config and report label-to-column offsets in
    their noise-free images (and whether the recorded image is reproduced bit for bit);
    with --integrity, verify the stored chunks instead. Exits 1 when a sample is not
    reproduced or is damaged."""
    from simgen import store

    try:
        root = store.open_store(store_path)
    except store.StoreError as err:
        fail(str(err))
    if integrity:
        _check_integrity(store_path, index)
        return
    _check_reproduction(store_path, root, index)


def _check_integrity(store_path: Path, index: list[int] | None) -> None:
    from simgen import store

    root = store.open_store(store_path, mode="r+")
    bad = store.damaged_indices(store_path, root, index)
    if not store.has_checksums(root):
        typer.echo(
            f"{store_path}: chunks carry no checksum (store made before simgen checksummed "
            "them): only missing and undecodable chunks are detected",
            err=True,
        )
    if not bad:
        typer.echo(f"{store_path}: no damaged sample")
        return
    for i, what in sorted(bad.items()):
        typer.echo(f"sample {i}: damaged ({what})")
    store.mark_incomplete(root, bad)
    fail(
        f"{store_path}: {len(bad)} damaged sample(s), now marked incomplete; run the same "
        "`simgen generate` again to recompute them",
        code=1,
    )


def _check_reproduction(store_path: Path, root, index: list[int] | None) -> None:
    import numpy as np

    from simgen import store
    from simgen.check import check_labels
    from simgen.config import SimgenConfig
    from simgen.pipeline import SAMPLE_VERSION, make_sample, sample_version

    try:
        cfg = SimgenConfig.from_dict(root.attrs["config"])
    except ValueError as err:
        fail(str(err))
    done = list(store.iter_complete(root))
    if not done:
        fail("the store holds no complete sample yet")
    made_by = sample_version(root.attrs)
    if made_by != SAMPLE_VERSION:
        typer.echo(
            f"{store_path}: made by sample version {made_by}, this simgen makes version "
            f"{SAMPLE_VERSION} (other noise draws): the stored labels are checked against "
            "the recomputed noise-free images; the recorded images are not compared",
            err=True,
        )
    differ = []
    for i in index or done[:3]:
        if i not in done:
            fail(f"sample {i} is not complete in {store_path}")
        sample = make_sample(cfg, i, calibration=root.attrs.get("calibration"))
        try:
            cols = store.read_columns(root, i)
            recorded = store.read_image(root, i)
        except store.StoreError as err:
            fail(str(err))
        occupied = cols["n_atoms"] > 0
        report = check_labels(sample.noise_free, cols["y"][occupied], cols["x"][occupied])
        if made_by != SAMPLE_VERSION:
            typer.echo(f"sample {i}: {report}")
            continue
        same = np.array_equal(sample.image, recorded)
        if not same:
            differ.append(i)
        typer.echo(f"sample {i}: {report}; recorded image reproduced bit for bit: {same}")
    if differ:
        fail(f"{store_path}: sample(s) {differ} not reproduced", code=1)


@app.command()
def figures(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder")] = Path("figures"),
    seed: Annotated[int, typer.Option(help="Seed of the acquisition draw")] = 0,
):
    """One PNG per acquisition stage (ideal, contamination, scan, current, shot, detector,
    labels) so you can see what each imperfection does."""
    from simgen.figures import make_figures

    paths = make_figures(output, seed=seed)
    for p in paths:
        typer.echo(f"wrote {p}")


def main():  # pragma: no cover
    sys.exit(app())
