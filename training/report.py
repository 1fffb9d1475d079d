"""Writing results: the per-epoch CSV log, metrics JSON and the confusion-matrix PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from simgen.store import atomic_write
from simgen.store import write_json as store_write_json

HISTORY_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_pixel_acc",
    "val_miou",
    "val_precision",
    "val_recall",
    "val_f1",
    "val_macro_f1",
    "seconds",
)


def write_history_csv(history: list[dict], path) -> Path:
    """Write the per-epoch log (one row per epoch, columns :data:`HISTORY_FIELDS`).

    The whole file is rewritten from ``history`` each time, so it always agrees with the
    checkpoint that holds the same history (also after a resumed run).

    Parameters
    ----------
    history : list of dict
        One dict per epoch; missing values are left empty.
    path : path-like

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    lines = [",".join(HISTORY_FIELDS)]
    for row in history:
        cells = []
        for key in HISTORY_FIELDS:
            v = row.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif isinstance(v, float):
                cells.append(f"{v:.6g}")
            else:
                cells.append(str(v))
        lines.append(",".join(cells))
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def read_history_csv(path) -> list[dict]:
    """Read a log written by :func:`write_history_csv` (numbers as float, epoch as int)."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.append(
                {
                    k: (int(v) if k == "epoch" else float(v)) if v != "" else None
                    for k, v in row.items()
                }
            )
    return out


def write_json(data: dict, path) -> Path:
    """Write ``data`` as indented JSON (NumPy values converted, NaN as null)."""
    return store_write_json(data, path)


def plot_confusion(matrix, class_names, path, *, title: str = "Columns (matched)") -> Path:
    """Save a confusion matrix as a PNG (rows true, columns predicted, row-normalised colours).

    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change.

    Parameters
    ----------
    matrix : array_like of int, shape (K, K)
        Counts, true class × predicted class.
    class_names : sequence of str
        Names of the K classes.
    path : path-like
        Output PNG.
    title : str

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.int64)
    names = list(class_names)
    # the background row/column of a column confusion matrix is always empty: drop it
    if m.shape[0] == len(names) and m.shape[0] > 1 and m[0].sum() == 0 and m[:, 0].sum() == 0:
        m, names = m[1:, 1:], names[1:]
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    k = len(names)
    size = 1.6 + 0.75 * k
    fig = Figure(figsize=(size + 1.2, size), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


#: File an ``evaluate --out`` folder carries: a later evaluation may replace what is there
#: only when it finds this marker (``finished`` false while the files are being written).
EVALUATE_MARKER = ".simgen-evaluate.json"


def claim_output_folder(out, *, tool: str, marker: str, is_ours=None) -> Path:
    """Make ``out`` the output folder of ``tool`` before any work: new, empty, or one it
    wrote (``is_ours(out)``, default: ``marker`` is there); anything else is refused by
    name, untouched. Writes ``marker`` when absent.

    Raises
    ------
    ValueError
        ``out`` is a file, or a folder holding files that ``tool`` did not write.
    """
    out = Path(out)
    ours = is_ours or (lambda folder: (folder / marker).is_file())
    if out.is_file() or out.is_symlink():
        raise ValueError(f"--out: {out} is a file; choose a folder for the output of `{tool}`")
    if out.is_dir() and any(out.iterdir()) and not ours(out):
        raise ValueError(
            f"--out: {out} already holds files that `{tool}` did not write (no {marker}); "
            "refusing to write into it: choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / marker).is_file():
        store_write_json({"tool": tool, "finished": False}, out / marker)
    return out


def claim_evaluate_output(out) -> Path:
    """Make ``out`` the output folder of an evaluation (:func:`claim_output_folder`); a
    later evaluation into it replaces what the earlier one wrote."""
    out = claim_output_folder(out, tool="simgen-train evaluate", marker=EVALUATE_MARKER)
    store_write_json({"tool": "simgen-train evaluate", "finished": False}, out / EVALUATE_MARKER)
    return out


def finish_evaluate_output(out) -> None:
    """Mark the evaluation in ``out`` complete (every file written)."""
    store_write_json(
        {"tool": "simgen-train evaluate", "finished": True}, Path(out) / EVALUATE_MARKER
    )


def plot_reliability(reliability: dict, path, *, title: str = "Reliability") -> Path:
    """Save a reliability diagram: class error rate of matched columns against their
    uncertainty, in bins of equal count (:func:`training.metrics.reliability_bins`).

    Parameters
    ----------
    reliability : dict
        ``mean_uncertainty``, ``error_rate``, ``count`` per bin and ``uncertainty`` (what it is).
    path : path-like
        Output PNG.
    title : str

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    u = np.asarray(reliability["mean_uncertainty"], dtype=np.float64)
    e = np.asarray(reliability["error_rate"], dtype=np.float64)
    n = np.asarray(reliability["count"], dtype=np.int64)
    fig = Figure(figsize=(4.8, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(u, e, "o-", color="C3")
    if len(u) and np.all(u > 0) and u.max() / u.min() > 10:
        ax.set_xscale("log")
    ax.set_xlabel(reliability.get("uncertainty", "uncertainty"), fontsize=8)
    ax.set_ylabel("class error rate of matched columns")
    rho = reliability.get("spearman")
    per_bin = f"{int(np.median(n))} columns per bin" if len(n) else "no columns"
    spearman = f", Spearman {rho:.2f}" if rho is not None else ""
    ax.set_title(f"{title} ({per_bin}{spearman})", fontsize=9)
    ax.set_ylim(-0.02, max(0.1, float(e.max()) * 1.15) if len(e) else 1.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
