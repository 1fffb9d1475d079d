"""A tiny ``simgen-train label`` output folder written without a network.

Each image is Gaussian blobs on a projected 2H lattice (``_fakestore.lattice_columns``)
saved as ``.npy``; its ``columns.csv`` / ``summary.json`` are written with the library's own
writers (``training.experiments.catalogue``), the ``defects`` scheme, probabilities drawn
per column, and the folder gets the label run's ownership marker. Stand-in for a real label
run in the review tests (the labelling chain itself is tested in test_label.py).
"""

from __future__ import annotations

import json

import numpy as np
from _fakestore import lattice_columns, render

from simgen.experiment.lattice import scheme_names
from structures import CHALCOGEN, METAL
from training.experiments.catalogue import (
    build_catalogue,
    flatten_summary,
    summarize,
    write_columns_csv,
    write_run_summary_csv,
    write_summary_json,
)

SCHEME = "defects"
NAMES = scheme_names(SCHEME)
#: fake-store kind -> (defects-scheme class name, site, detected)
KIND_CLASS = {
    "M": ("metal", METAL, True),
    "X2": ("chalcogen", CHALCOGEN, True),
    "vac_X1": ("vac_X1", CHALCOGEN, True),
    "vac_X2": ("vac_X2", CHALCOGEN, False),
    "vac_M": ("vac_M", METAL, False),
}
PIXEL_A = 0.2
A_A = 3.32


def write_label_folder(root, n_images=2, shape=(96, 96), seed=0, *, fake_names=False,
                       pixel_size_A=PIXEL_A):  # fmt: skip
    """Write ``root/img<k>/{columns.csv, summary.json}``, the images under
    ``root/../<root>_sources/``, ``root/summary.csv`` and ``root/.simgen-label.json``.

    ``fake_names``: classes named as in ``_fakestore.SCHEME`` (``M``, ``X2``, ...) instead of
    the ``defects`` scheme, to match a network trained on a fake store.

    Returns
    -------
    dict
        ``names`` (per-image folders) and ``truth`` (per image: x, y, class names).
    """
    from pathlib import Path

    root = Path(root)
    sources = root.parent / f"{root.name}_sources"
    sources.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    names, rows, truth = [], [], []
    scheme = SCHEME
    if fake_names:
        from _fakestore import SCHEME as FAKE

        scheme = {"ids": [0, *FAKE["ids"]], "names": ["background", *FAKE["names"]]}
    class_names = scheme_names(scheme)
    for k in range(n_images):
        rng = np.random.default_rng([seed, k])
        x, y, kinds = lattice_columns(shape, pixel_size_A, A_A, rng, defect_rate=0.1)
        cls = [KIND_CLASS[kd] for kd in kinds]
        if fake_names:
            cls = [(kd, site, det) for kd, (_, site, det) in zip(kinds, cls, strict=True)]
        weights = np.array([{"M": 1.0, "X2": 0.6, "vac_X1": 0.3}.get(kd, 0.0) for kd in kinds])
        image = render(shape, x, y, weights, 0.4 / pixel_size_A) + 0.05
        image = rng.poisson(image * 50).astype(np.float32)
        src = sources / f"img{k}.npy"
        np.save(src, image)
        cid = np.array([class_names.index(c[0]) for c in cls])
        prob = rng.uniform(0.4, 1.0, len(cid))
        cat = build_catalogue(
            np.column_stack([x, y]),
            cid,
            scheme,
            pixel_size_A,
            site=np.array([c[1] for c in cls]),
            probability=prob,
            variance=rng.uniform(0, 0.01, len(cid)),
            detected=np.array([c[2] for c in cls]),
        )
        summary = summarize(cat, scheme, shape, pixel_size_A, lattice_constant_A=A_A)
        summary.update(
            {
                "source": str(src),
                "frame": None,
                "model": {"members": 1, "class_names": list(class_names)},
                "lattice": {"lattice_constant_table_A": A_A, "material": "WSe2"},
                "quality": {"verdict": "ok"},
            }
        )
        name = f"img{k}"
        (root / name).mkdir(exist_ok=True)
        write_columns_csv(cat, root / name / "columns.csv")
        write_summary_json(summary, root / name / "summary.json")
        rows.append(flatten_summary(summary, image=name, source=str(src), status="ok"))
        names.append(name)
        truth.append({"x": x, "y": y, "classes": [c[0] for c in cls]})
    write_run_summary_csv(rows, root / "summary.csv")
    (root / "failures.txt").write_text("")
    (root / ".simgen-label.json").write_text(
        json.dumps({"tool": "simgen-train label", "images": names, "finished": True})
    )
    return {"names": names, "truth": truth}
