"""Figures measured before the issue-16 changes, printed beside the new ones.

Two sets, because this kind of machine (2 cores shared with other jobs) is noisy:

* ``ISSUE16``: the figures issue 16 was filed with (quiet machine, old code).
* ``SESSION``: the old code (commit 1c335df) measured on 2026-12-01 at 11:00 UTC in the same
  session as the new code, load average 3.3–4.7 on 2 cores (so ~2–3× slower than quiet);
  compare these with a run at a similar load, not with the quiet figures.

Seconds per 512² image unless named otherwise; ``None`` where not measured.
"""

from __future__ import annotations

ISSUE16 = {
    "date": "issue 16 (quiet 2-core machine)",
    "chain_ms": {
        "contamination": 16.0,
        "scan": 29.0,
        "labels_map": 22.0,
        "current": None,
        "shot": 10.0,
        "detector": None,
        "chain": 139.0,
        "mask": 15.0,
        "check": 34.0,
    },
    "generate_samples_per_s": {(256, 2): 8.0},  # with cluster start-up
    "label_columns_per_min": {False: 98_000, True: 21_000},  # TTA: 17-25k
}

SESSION = {
    "date": "2026-12-01 11:00 UTC, old code, load 3.3-4.7 on 2 cores",
    "chain_ms": {  # median of 7, two alternating runs with the new code (benchmarks/ab)
        "contamination": 17.2,
        "scan": 58.4,
        "labels_map": 71.0,
        "current": 5.1,
        "shot": 20.6,
        "detector": 5.5,
        "chain": 275.1,
        "mask": 35.2,
        "check": 131.7,
    },
    # bench_generate on the old code, 11:08-11:13 UTC, load 5.3-7.7 (other jobs running)
    "generate_samples_per_s": {(256, 1): 1.97, (256, 2): 1.60, (512, 1): 0.76, (512, 2): 0.87},
    "label_columns_per_min": {False: 20_378, True: None},  # load ~4.5, model runs/wse2
}


#: ``simgen generate`` on a quiet machine (load 0.1-1.2) on 2026-12-02, just before tasks
#: grouped samples and the workers' malloc settings changed (commit 6ecbee6); same bench.
QUIET_BEFORE = {
    "date": "2026-12-02 02:10 UTC, commit 6ecbee6, quiet (load 0.1-1.2)",
    "generate_samples_per_s": {(256, 1): 1.96, (256, 2): 3.37, (512, 1): 1.13, (512, 2): 1.87},
}

#: Labelling before the labelling-speed commit (4a8659e, in a worktree), quiet machine
#: (load 0.5-1.6), 2026-12-02 13:30 UTC, the same image and recipe-sized model as after.
LABEL_QUIET_BEFORE = {
    "date": "2026-12-02 13:30 UTC, commit 4a8659e, quiet",
    "label_columns_per_min": {False: 64_864, True: None},
}


def fmt(value, spec: str = ".1f") -> str:
    """``value`` formatted, or ``-`` when not measured."""
    return "-" if value is None else format(value, spec)
