"""Lattice parameters of 2H transition-metal dichalcogenide monolayers.

Pure data and arithmetic: no file access. Lengths in Å.
See ``docs/structures.md`` for the table with its sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ase.data import atomic_numbers

METALS = ("Mo", "W")
CHALCOGENS = ("S", "Se", "Te")

#: (metal, chalcogen) -> (in-plane lattice constant a [Å], chalcogen-chalcogen vertical
#: distance d_XX [Å]).  Bulk 2H experimental values (Schutte et al. 1987; Puotinen &
#: Newnham 1961) where they exist; 2H-WTe2 is not a stable bulk phase, DFT value (C2DB,
#: Haastrup et al. 2018).  Monolayer values differ from bulk by < 0.5 %.
LATTICE_TABLE: dict[tuple[str, str], tuple[float, float]] = {
    ("Mo", "S"): (3.160, 3.172),
    ("W", "S"): (3.153, 3.142),
    ("Mo", "Se"): (3.289, 3.340),
    ("W", "Se"): (3.282, 3.360),
    ("Mo", "Te"): (3.519, 3.604),
    ("W", "Te"): (3.550, 3.630),
}

#: Metal-site elements that may appear as dopants (any element ASE knows is accepted;
#: these are the common ones, listed for documentation).
COMMON_DOPANTS = ("V", "Nb", "Ta", "Re", "Cr", "Mn", "Fe", "Co", "Ti")


@dataclass(frozen=True)
class Composition:
    """Sublattice fractions of a (possibly alloyed) 2H MX2 monolayer.

    Parameters
    ----------
    metals : mapping
        Metal element -> fraction of metal sites, e.g. ``{"Mo": 0.7, "W": 0.3}``.
    chalcogens : mapping
        Chalcogen element -> fraction of chalcogen atoms, e.g. ``{"S": 0.5, "Se": 0.5}``.
    """

    metals: tuple[tuple[str, float], ...]
    chalcogens: tuple[tuple[str, float], ...]

    @property
    def metal_fractions(self) -> dict[str, float]:
        return dict(self.metals)

    @property
    def chalcogen_fractions(self) -> dict[str, float]:
        return dict(self.chalcogens)

    @property
    def host_chalcogen(self) -> str:
        """The majority chalcogen (ties broken by lower Z)."""
        return max(self.chalcogens, key=lambda kv: (kv[1], -atomic_numbers[kv[0]]))[0]

    @property
    def formula(self) -> str:
        def part(items):
            if len(items) == 1:
                return items[0][0]
            return "(" + "".join(f"{el}{frac:g}" for el, frac in items) + ")"

        return f"{part(self.metals)}{part(self.chalcogens)}2"


def _check_fractions(fractions: Mapping[str, float], allowed: tuple[str, ...], name: str):
    if not isinstance(fractions, Mapping) or len(fractions) == 0:
        raise ValueError(f"{name}: expected a non-empty mapping element -> fraction")
    for element, fraction in fractions.items():
        if element not in allowed:
            raise ValueError(f"{name}: unknown element {element!r}; expected one of {allowed}")
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"{name}: fraction of {element} must be in [0, 1], got {fraction}")
    total = sum(float(f) for f in fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name}: fractions must sum to 1, got {total:g}")


def parse_material(material: str) -> tuple[str, str]:
    """Split a formula like ``"WSe2"`` into ``("W", "Se")``.

    Raises
    ------
    ValueError
        If the formula is not one of the 2H MX2 materials M in {Mo, W}, X in {S, Se, Te}.
    """
    text = str(material).strip()
    for metal in METALS:
        for chalcogen in CHALCOGENS:
            if text in (f"{metal}{chalcogen}2", f"{metal}{chalcogen}"):
                return metal, chalcogen
    raise ValueError(
        f"material: unknown material {material!r}; expected MX2 with M in {METALS} and X in "
        f"{CHALCOGENS} (e.g. 'MoS2', 'WSe2'), or give metals/chalcogens fractions for an alloy"
    )


def make_composition(
    material: str | None = None,
    metals: Mapping[str, float] | None = None,
    chalcogens: Mapping[str, float] | None = None,
) -> Composition:
    """Build a validated :class:`Composition` from a formula or sublattice fractions.

    Parameters
    ----------
    material : str, optional
        A pure compound such as ``"MoS2"``. Fractions given alongside override its
        sublattice.
    metals, chalcogens : mapping, optional
        Sublattice fractions for alloys, e.g. ``metals={"Mo": 0.5, "W": 0.5}``.
    """
    m_default = c_default = None
    if material is not None:
        m_default, c_default = parse_material(material)
    if metals is None:
        if m_default is None:
            raise ValueError("metals: give a material (e.g. 'MoS2') or metal fractions")
        metals = {m_default: 1.0}
    if chalcogens is None:
        if c_default is None:
            raise ValueError("chalcogens: give a material (e.g. 'MoS2') or chalcogen fractions")
        chalcogens = {c_default: 1.0}
    _check_fractions(metals, METALS, "metals")
    _check_fractions(chalcogens, CHALCOGENS, "chalcogens")
    order = lambda kv: atomic_numbers[kv[0]]  # noqa: E731
    return Composition(
        tuple(sorted(((k, float(v)) for k, v in metals.items() if v > 0), key=order)),
        tuple(sorted(((k, float(v)) for k, v in chalcogens.items() if v > 0), key=order)),
    )


def lattice_parameters(composition: Composition) -> tuple[float, float]:
    """Lattice constant ``a`` and chalcogen-chalcogen height ``d_XX`` in Å (Vegard's law).

    For an alloy (M_1-x M'_x)(X_1-y X'_y)2 both follow the fraction-weighted mean of the
    four end members, which matches experiment within ~0.3 % for these alloys.
    """
    a = d = 0.0
    for metal, fm in composition.metals:
        for chalcogen, fx in composition.chalcogens:
            a_ij, d_ij = LATTICE_TABLE[(metal, chalcogen)]
            a += fm * fx * a_ij
            d += fm * fx * d_ij
    return a, d
