"""Parameters that are either fixed or drawn per sample.

A parameter in a config file is written as a plain number, or as a one-key mapping::

    defocus_A: 0.0                      # fixed
    defocus_A: {uniform: [-20, 20]}     # uniform on [low, high]
    defocus_A: {normal: [0, 10]}        # normal(mean, std)
    defocus_A: {lognormal: [0, 0.5]}    # exp(normal(mu, sigma))
    source_size_A: {loguniform: [0.3, 1.0]}
    material: {choice: [MoS2, WSe2]}   # one of the listed values, equal odds

Every draw takes an explicit ``rng`` so sample i depends only on (seed, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("fixed", "uniform", "normal", "lognormal", "loguniform", "choice")


def as_rng(rng: np.random.Generator | int | np.random.SeedSequence | None) -> np.random.Generator:
    """Normalise ``rng`` (Generator, int, SeedSequence or None) to a Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


@dataclass(frozen=True)
class Distribution:
    """A fixed value or a distribution to draw a per-sample value from.

    Parameters
    ----------
    kind : str
        One of ``fixed, uniform, normal, lognormal, loguniform, choice``.
    args : tuple
        ``(value,)`` for fixed; ``(low, high)`` for uniform/loguniform; ``(mean, std)``
        for normal/lognormal; the options for choice.
    """

    kind: str
    args: tuple

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown distribution {self.kind!r}; expected one of {KINDS}")
        a = self.args
        for v in a:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"expected finite numbers, got {list(a)}")
        if self.kind == "fixed" and len(a) != 1:
            raise ValueError("a fixed value takes exactly one number")
        if self.kind in ("uniform", "loguniform", "normal", "lognormal") and len(a) != 2:
            raise ValueError(f"{self.kind} takes two numbers, got {list(a)}")
        if self.kind in ("uniform", "loguniform") and not a[0] <= a[1]:
            raise ValueError(f"{self.kind} range must have low <= high, got {list(a)}")
        if self.kind == "loguniform" and a[0] <= 0:
            raise ValueError(f"loguniform range must be positive, got {list(a)}")
        if self.kind in ("normal", "lognormal") and a[1] < 0:
            raise ValueError(f"{self.kind} standard deviation must be >= 0, got {a[1]}")
        if self.kind == "choice" and len(a) == 0:
            raise ValueError("choice needs at least one option")

    # -- construction -------------------------------------------------------------
    @classmethod
    def parse(cls, value: Any, name: str = "parameter") -> Distribution:
        """Build from a config value: a number/string, or ``{kind: args}``."""
        if isinstance(value, Distribution):
            return value
        if isinstance(value, dict):
            if len(value) != 1:
                raise ValueError(
                    f"{name}: a distribution is one key out of {KINDS[1:]}, got {list(value)}"
                )
            ((kind, args),) = value.items()
            if kind not in KINDS:
                raise ValueError(f"{name}: unknown distribution {kind!r}; expected one of {KINDS}")
            if not isinstance(args, list | tuple):
                args = (args,)
            try:
                return cls(kind, tuple(args))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        if isinstance(value, list | tuple):
            raise ValueError(
                f"{name}: write a range as {{uniform: {list(value)}}}, not a bare list"
            )
        try:
            return cls("fixed", (value,))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def to_config(self) -> Any:
        """Inverse of :meth:`parse` (YAML-friendly)."""
        if self.kind == "fixed":
            return self.args[0]
        return {self.kind: list(self.args)}

    # -- queries ------------------------------------------------------------------
    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value this can produce (±4σ for normals)."""
        a = self.args
        if self.kind == "fixed":
            return (a[0], a[0])
        if self.kind in ("uniform", "loguniform"):
            return (a[0], a[1])
        if self.kind == "normal":
            return (a[0] - 4 * a[1], a[0] + 4 * a[1])
        if self.kind == "lognormal":
            return (math.exp(a[0] - 4 * a[1]), math.exp(a[0] + 4 * a[1]))
        return (min(a), max(a))

    def centre(self):
        """The typical value: the fixed value, the mean of a normal, the middle of a uniform
        range, the geometric mean of a log-uniform one, ``exp(mean)`` of a lognormal, the
        first choice."""
        a = self.args
        if self.kind == "uniform":
            return 0.5 * (a[0] + a[1])
        if self.kind == "loguniform":
            return math.sqrt(a[0] * a[1])
        if self.kind == "lognormal":
            return math.exp(a[0])
        return a[0]

    def check_range(self, name: str, low: float | None = None, high: float | None = None):
        """Raise ``ValueError`` naming ``name`` when any value could leave [low, high]."""
        if self.kind == "choice" and not all(isinstance(v, int | float) for v in self.args):
            return
        lo, hi = self.bounds()
        if self.kind in ("normal",) and low is not None:
            lo = self.args[0]  # normals are clipped at draw time; the centre must be valid
            hi = self.args[0]
        if low is not None and lo < low:
            raise ValueError(f"{name}: values must be >= {low}, got {self.to_config()}")
        if high is not None and hi > high:
            raise ValueError(f"{name}: values must be <= {high}, got {self.to_config()}")

    def draw(self, rng, low: float | None = None, high: float | None = None):
        """Draw one value; normals are clipped to [low, high] when given."""
        a = self.args
        if self.kind == "fixed":
            return a[0]
        rng = as_rng(rng)
        if self.kind == "uniform":
            v = float(rng.uniform(a[0], a[1]))
        elif self.kind == "normal":
            v = float(rng.normal(a[0], a[1]))
        elif self.kind == "lognormal":
            v = float(rng.lognormal(a[0], a[1]))
        elif self.kind == "loguniform":
            v = float(math.exp(rng.uniform(math.log(a[0]), math.log(a[1]))))
        else:
            return a[int(rng.integers(len(a)))]
        if low is not None:
            v = max(v, low)
        if high is not None:
            v = min(v, high)
        return v
