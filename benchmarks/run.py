"""`make bench`: print every benchmark table (speed figures, not pass/fail)."""

from __future__ import annotations

import importlib
import sys
import traceback

BENCHES = (
    "bench_simulate",
    "bench_convergence",
    "bench_acquisition",
    "bench_generate",
    "bench_training",
    "bench_label",
    "bench_real",
    "bench_match",
    "bench_robustness",
    "bench_dynamics",
)


def main(names: list[str] | None = None) -> int:
    failed = 0
    for name in names or BENCHES:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ImportError as err:
            print(f"\n== {name}: not available ({err})")
            continue
        try:
            module.main()
        except Exception:  # keep going: one broken benchmark must not hide the others
            failed += 1
            print(f"\n== {name} failed:")
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
