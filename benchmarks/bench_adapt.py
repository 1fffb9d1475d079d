"""Self-training on the real images: ``simgen-train adapt`` on ``../shared/real/`` (not
part of ``make bench``: ~40 min on 2 CPU cores).

Runs ``adapt`` with the matched WSe2 model (``$SIMGEN_REAL_MODEL``, else
``runs/wse2_matched``, docs/match.md) on every image of ``../shared/real/wse2_80kV_adf/``
into ``runs/wse2_adapted`` (or reads an ``adapt.json`` already there), then prints, per
acquisition series (``benchmarks.bench_real.series_of``), the quality verdicts, the
honeycomb consistency and the spread of every class fraction before and after, and the
simulated held-out macro F1 before and after. Skipped when ``../shared/real/`` is absent.

    python -m benchmarks.bench_adapt [ADAPTED_DIR]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.bench_real import REAL, series_of

FOLDER = REAL / "wse2_80kV_adf"


def _spread(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    lo, hi = min(v), max(v)
    ratio = f"x{hi / lo:.2f}" if lo > 0 else "x inf"
    return f"{lo:.3f}-{hi:.3f} ({ratio})"


def main(adapted: str | None = None) -> None:
    print("\n== Self-training on the real images (simgen-train adapt)")
    files = sorted(FOLDER.glob("*.tif"))
    if not files:
        print("   skipped: ../shared/real/ is absent (development data, not shipped)")
        return
    out = Path(adapted or "runs/wse2_adapted")
    if not (out / "adapt.json").is_file():
        from training.adapt import adapt

        model = Path(os.environ.get("SIMGEN_REAL_MODEL") or "runs/wse2_matched")
        if not model.exists():
            print(f"   skipped: no model {model} (train it with the recipe of docs/match.md)")
            return
        adapt(model, [str(FOLDER)], out, material="WSe2", progress=False)
    report = json.loads((out / "adapt.json").read_text())
    print(f"   {out}: settings {report['settings']}")
    f1b, f1a = report["f1_before"]["mean"], report["f1_after"]["mean"]
    print(f"   simulated held-out macro F1: {f1b:.4f} -> {f1a:.4f} (drop {f1b - f1a:+.4f})")
    for name, paths in series_of(files).items():
        stems = {p.stem for p in paths}
        print(f"   {name}: {len(stems)} images")
        for when in ("before", "after"):
            figs = {k: v for k, v in report[f"images_{when}"].items() if k in stems}
            verdicts = [f["verdict"] for f in figs.values()]
            ok = sum(v == "ok" for v in verdicts)
            honey = _spread([f["honeycomb_consistency"] for f in figs.values()])
            print(f"     {when:<6} verdict ok {ok}/{len(verdicts)}, honeycomb {honey}")
            classes = sorted({c for f in figs.values() for c in f["fractions"]})
            for c in classes:
                if c in ("metal", "chalcogen"):
                    continue
                fr = [f["fractions"].get(c, 0.0) for f in figs.values()]
                print(f"       {c:<10} {_spread(fr)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
