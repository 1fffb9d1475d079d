"""Figures measured before the issue-16 changes, printed beside the new ones.

* ``ISSUE16``: the figures issue 16 was filed with (quiet machine, old code).
* ``BEFORE_V2``: sample version 1, the same day as the version-2 speed-ups, quiet.
* ``LABEL_QUIET_BEFORE``: labelling before its speed-ups, quiet.

This kind of machine (2 shared cores) varies by ±20 % from minute to minute: compare runs
made close together.

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

#: Labelling before the labelling-speed commit (4a8659e, in a worktree), quiet machine
#: (load 0.5-1.6), 2026-12-02 13:30 UTC, the same image and recipe-sized model as after.
LABEL_QUIET_BEFORE = {
    "date": "2026-12-02 13:30 UTC, commit 4a8659e, quiet",
    "label_columns_per_min": {False: 64_864, True: None},
}


#: Sample version 1 (commit 76f339d) on a quiet machine (load 0.1-1.2), 2026-12-02
#: 18:20 UTC, just before the sample-version-2 speed-ups: the same benches, in process
#: (``make_sample`` median of 10 at 512², without the workers' malloc settings) and
#: ``simgen generate`` (48 samples at 512², 64 at 256², 8 per task).
BEFORE_V2 = {
    "date": "2026-12-02 18:20 UTC, commit 76f339d (sample version 1), quiet",
    "chain_ms": {
        "contamination": 2.7,
        "scan": 27.0,
        "labels_map": 14.0,
        "current": 1.8,
        "shot": 14.9,
        "detector": 3.8,
        "chain": 66.1,
        "mask": 3.2,
        "check": 41.0,
        "sample": 111.2,
    },
    "generate_samples_per_s": {(256, 1): 15.02, (256, 2): 28.63, (512, 1): 6.25, (512, 2): 14.05},
}


def fmt(value, spec: str = ".1f") -> str:
    """``value`` formatted, or ``-`` when not measured."""
    return "-" if value is None else format(value, spec)
