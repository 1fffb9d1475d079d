"""Does finetuning on 3 corrected images help? Macro defect F1 before and after (CPU-sized).

``main()`` (a few minutes on one core):

1. generates a **training store** (simgen's incoherent model, WSe2, 128² px at 0.2 Å, the
   default defects) and trains a small U-Net on it (depth 2, width 8, 10 × 128 crops);
2. generates 13 **"experiments"** under conditions the simulation did not cover (another
   seed, a blurrier probe, more contamination and scan jitter, lower dose, 4× the vacancy
   concentrations), writes the first 3 as ``.npy`` files and labels them with
   ``simgen-train label``'s library call;
3. **corrupts** those predictions on purpose (25 % of the classes swapped to another class
   allowed on the site, 5 % of the columns dropped, 5 spurious columns added) and has a
   simulated reviewer **correct them through the review app's HTTP API** from the true
   columns (change the class, add the missed column, delete the spurious one), then save;
4. **finetunes** the model from those corrections (``training.finetune.finetune``, half the
   draws real, 10 epochs) and, as a control, continues it for the same steps on the
   simulated store alone;
5. scores base, control and finetuned models on the **10 held-out experiments**
   (``training.evaluate.evaluate_stores``): macro F1 over the defect classes present, and
   each class's F1, average precision and AUROC.

Not pass/fail: prints a table (the figures are in docs/training.md).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

SIM = {
    "simulation.model": "incoherent",
    "simulation.device": "cpu",
    "structure.material": "WSe2",
    "acquisition.shot.lambda_counts": {"uniform": [30.0, 60.0]},
    "acquisition.contamination.rel": {"uniform": [0.0, 0.1]},
    "dataset.image_size": [128, 128],
    "optics.pixel_size_A": 0.2,
}
#: The "experimental conditions" the simulation did not cover: a blurrier probe, more
#: contamination and scan jitter, less dose, 4x the vacancies.
EXPERIMENT = {
    "dataset.seed": 11,
    "dataset.n_samples": 13,
    "structure.defects": {"vac_X1": 0.16, "vac_X2": 0.04, "vac_M": 0.04},
    "optics.source_size_A": {"uniform": [0.9, 1.1]},
    "acquisition.contamination.rel": {"uniform": [0.2, 0.4]},
    "acquisition.jitter.line_x_A": {"uniform": [0.1, 0.2]},
    "acquisition.shot.lambda_counts": {"uniform": [15.0, 30.0]},
}
N_CORRECTED = 3


def _generate(cfg, out: Path) -> Path:
    from benchmarks.bench_label import _generate as generate

    return generate(cfg, out)


def _train_base(store: Path, out: Path) -> Path:
    from training.config import TrainConfig
    from training.train import train_model

    config = TrainConfig.from_dict(
        {
            "seed": 0,
            "epochs": 10,
            "val_every": 5,
            "progress": False,
            "num_threads": 1,
            "data": {
                "train_stores": [str(store)],
                "crop": 64,
                "batch_size": 16,
                "val_fraction": 0.1,
                "samples_per_epoch": 128,
            },
            "model": {"depth": 2, "width": 8},
            "optim": {"lr": 0.01},
        }
    )
    return train_model(config, out).out_dir


def _truth(root, i):
    o, n = int(root["columns/offset"][i]), int(root["columns/count"][i])
    return {k: np.asarray(root[f"columns/{k}"][o : o + n]) for k in ("x", "y", "class_id")}


def corrupt(folder: Path, rng) -> None:
    """Swap 25 % of the classes, drop 5 % of the rows, add 5 spurious ones, in columns.csv."""
    from simgen.experiment.lattice import allowed_sites
    from training.experiments.catalogue import build_catalogue, read_columns_csv, write_columns_csv

    summary = json.loads((folder / "summary.json").read_text())
    names = summary["model"]["class_names"]
    scheme = {"ids": list(range(len(names))), "names": names}
    cat = read_columns_csv(folder / "columns.csv", scheme, summary["pixel_size_A"])
    allowed = allowed_sites(scheme)
    cid = cat.class_id.copy()
    for k in np.flatnonzero(rng.random(len(cid)) < 0.25):
        options = [names.index(n) for n, s in allowed.items() if cat.site[k] in s]
        options = [c for c in options if c != cid[k]]
        if options and cat.site[k] >= 0:
            cid[k] = rng.choice(options)
    keep = rng.random(len(cid)) >= 0.05
    h, w = summary["image_shape"]
    extra = rng.uniform([5, 5], [w - 5, h - 5], size=(5, 2))
    metal = names.index("metal")
    write_columns_csv(
        build_catalogue(
            np.concatenate([cat.positions_px[keep], extra]),
            np.concatenate([cid[keep], [metal] * 5]),
            scheme,
            cat.pixel_size_A,
            site=np.concatenate([cat.site[keep], [0] * 5]),
            probability=np.concatenate([cat.probability[keep], [0.5] * 5]),
            variance=np.concatenate([cat.variance[keep], [0.0] * 5]),
            detected=np.concatenate([cat.detected[keep], [True] * 5]),
        ),
        folder / "columns.csv",
    )


def review_through_api(labelled: Path, truths: dict, radius_px: float) -> dict:
    """A reviewer who knows the truth, working through the HTTP API; returns edit counts."""
    from training.experiments.review_app import create_app
    from training.metrics import match_columns

    client = create_app(labelled).test_client()
    counts = {"change": 0, "add": 0, "delete": 0, "refused": 0}
    for i, im in enumerate(client.get("/api/images").get_json()["images"]):
        truth = truths[im["name"]]
        st = client.get(f"/api/images/{i}").get_json()
        names = [c["name"] for c in st["classes"]]
        by_id = {c["id"]: c["name"] for c in st["classes"]}
        cols = st["columns"]
        pred_xy = np.array([[c["x"], c["y"]] for c in cols])
        true_xy = np.column_stack([truth["x"], truth["y"]])
        h, w = st["shape"]
        pi, ti, _ = match_columns(pred_xy, true_xy, radius_px)
        matched_p, matched_t = set(pi.tolist()), set(ti.tolist())

        def post(body, i=i):
            r = client.post(f"/api/images/{i}/edits", json=body)
            counts[body["action"] if r.status_code == 200 else "refused"] += 1

        for p, t in zip(pi, ti, strict=True):
            want = truth["names"][t]
            have = by_id[cols[p]["class_id"]]
            if want == have or want not in names:
                continue
            if want in st["allowed"][cols[p]["site"]]:
                post({"action": "change", "column": cols[p]["column"], "class": want})
            else:  # on the wrong sublattice: remove and add again with the right class
                post({"action": "delete", "column": cols[p]["column"]})
                post({"action": "add", "x": truth["x"][t], "y": truth["y"][t], "class": want})
        for p in sorted(set(range(len(cols))) - matched_p):
            post({"action": "delete", "column": cols[p]["column"]})
        for t in sorted(set(range(len(true_xy))) - matched_t):
            x, y = float(truth["x"][t]), float(truth["y"][t])
            if 1 <= x < w - 1 and 1 <= y < h - 1 and truth["names"][t] in names:
                post({"action": "add", "x": x, "y": y, "class": truth["names"][t]})
    client.post("/api/save")
    return counts


def macro_defect(result: dict) -> dict:
    """Macro F1 / AP / AUROC over the defect classes with support."""
    from structures import defect_classes

    names = list(result["classes"])
    defects = [n for n in defect_classes(["background", *names]) if n in result["classes"]]
    present = [n for n in defects if result["classes"][n]["support"] > 0]

    def mean(key):
        # a class present but never predicted has F1 0 (precision undefined), AP/AUROC as is
        vals = [result["classes"][n].get(key) for n in present]
        vals = [0.0 if v is None and key == "f1" else v for v in vals]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else float("nan")

    return {"classes": present, "f1": mean("f1"), "ap": mean("ap"), "auroc": mean("auroc")}


def run(work: Path, epochs: int = 10) -> dict:
    import torch
    import zarr

    from simgen.config import load_config
    from training.evaluate import evaluate_stores
    from training.experiments.label import label_files
    from training.finetune import finetune

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base_cfg = load_config().with_overrides(SIM)
    # a work folder of an earlier run keeps its stores and base model (generate resumes)
    train = _generate(base_cfg.with_overrides({"dataset.n_samples": 48}), work / "train.zarr")
    exp = _generate(base_cfg.with_overrides(EXPERIMENT), work / "exp.zarr")
    t_gen = time.perf_counter() - t0
    base = work / "base"
    if not (base / "best.pt").is_file():
        base = _train_base(train, base)
    t_base = time.perf_counter() - t0 - t_gen
    import shutil

    for name in ("raw", "labelled", "finetuned", "control"):
        shutil.rmtree(work / name, ignore_errors=True)
    root = zarr.open_group(str(exp), mode="r")
    scheme_names = list(root.attrs["label_scheme"]["names"])
    ids = list(root.attrs["label_scheme"]["ids"])
    raw = work / "raw"
    raw.mkdir()
    truths = {}
    for i in range(N_CORRECTED):
        np.save(raw / f"exp{i}.npy", np.asarray(root["images"][i], dtype=np.float32))
        t = _truth(root, i)
        t["names"] = [scheme_names[ids.index(int(c))] for c in t["class_id"]]
        truths[f"exp{i}"] = t
    labelled = work / "labelled"
    lab = label_files([raw], base, labelled, pixel_size_A=0.2, material="WSe2",
                      progress=False, tta=False, tile=128, echo=lambda _: None)  # fmt: skip
    rng = np.random.default_rng(0)
    for name in truths:
        corrupt(labelled / name, rng)
    edits = review_through_api(labelled, truths, radius_px=0.7 / 0.2)
    t_review = time.perf_counter() - t0 - t_gen - t_base
    split = {
        "epochs": epochs,
        "val_every": 5,
        "optim.lr": 0.003,
        "data.train_range": [0, 43],
        "data.val_stores": [str(train)],
        "data.val_range": [43, 48],
    }
    tuned = work / "finetuned"
    finetune(base, [labelled], tuned, real_fraction=0.5, overrides=split)
    control = work / "control"
    finetune(base, [labelled], control, real_fraction=0.0, overrides=split)
    t_tune = time.perf_counter() - t0 - t_gen - t_base - t_review
    scores = {}
    for name, model in (("base", base), ("control (sim only)", control), ("finetuned", tuned)):
        res = evaluate_stores(
            model, [exp], sample_range=(N_CORRECTED, 13), device="cpu", tile=128,
            out_dir=work / f"eval_{name.split()[0]}",
        )  # fmt: skip
        scores[name] = {"macro": macro_defect(res), "classes": res["classes"],
                        "detection": res["detection"]}  # fmt: skip
    return {
        "labelled": len(lab.labelled),
        "edits": edits,
        "scores": scores,
        "seconds": {
            "generate": t_gen,
            "base": t_base,
            "label+review": t_review,
            "finetune x2": t_tune,
        },  # fmt: skip
    }


def main(work: str | None = None, epochs: int = 10) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = run(Path(work) if work else Path(tmp), epochs)
    print(f"\n== finetune from 3 corrected images ({epochs} epochs): 10 held-out experiments (CPU)")
    print(f"labelled {out['labelled']} images; reviewer's edits through the API: {out['edits']}")
    for name, s in out["scores"].items():
        m = s["macro"]
        print(f"{name:>20}: macro defect F1 {m['f1']:.3f}  mAP {m['ap']:.3f}  "
              f"AUROC {m['auroc']:.3f}  (detection F1 {s['detection']['f1']:.3f})")  # fmt: skip
        for cls, c in s["classes"].items():
            if c["support"]:
                print(f"{'':>22}{cls:>10}: support {c['support']:5d}  F1 {c['f1'] or 0:.3f}"
                      f"  AP {c.get('ap') or 0:.3f}  AUROC {c.get('auroc') or 0:.3f}")  # fmt: skip
    print("seconds:", {k: round(v) for k, v in out["seconds"].items()})
    return out


if __name__ == "__main__":
    import sys

    # python -m benchmarks.bench_finetune [WORK_DIR [EPOCHS [RESULT.json]]]
    result = main(
        sys.argv[1] if len(sys.argv) > 1 else None, int(sys.argv[2]) if len(sys.argv) > 2 else 10
    )
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(json.dumps(result, indent=2, default=str))
