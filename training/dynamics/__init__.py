"""Image-stack dynamics: columns tracked through the frames onto lattice sites, events,
per-site instability (intensity and a convolutional autoencoder), and the spatial
statistics of unstable sites. ``simgen-train dynamics STACK -o OUT``; ``docs/dynamics.md``.

Modules: :mod:`~training.dynamics.stack` (reading), :mod:`~training.dynamics.tracking`
(registration and linking), :mod:`~training.dynamics.events` (states and events),
:mod:`~training.dynamics.autoencoder`, :mod:`~training.dynamics.spatial` (instability,
density, clustering), :mod:`~training.dynamics.analysis` (the pipeline and its files),
:mod:`~training.dynamics.truth` (scores against a simulated movie's ground truth).
"""

from training.dynamics.analysis import (
    DynamicsResult,
    DynamicsSettings,
    analyse_stack,
    write_outputs,
)
from training.dynamics.stack import Stack, read_stack
from training.dynamics.tracking import StackError, Tracks, track_stack

__all__ = [
    "DynamicsResult",
    "DynamicsSettings",
    "Stack",
    "StackError",
    "Tracks",
    "analyse_stack",
    "read_stack",
    "track_stack",
    "write_outputs",
]
