"""The dataset configuration: one frozen, validated object per stage, round-tripped to
YAML and stored in every dataset's attributes.

``SimgenConfig`` sections: ``structure``, ``optics``, ``simulation``, ``acquisition``,
``labels``, ``dataset``. ``simgen config init`` writes the annotated default
(``simgen/data/default.yaml``). Unknown keys and out-of-range values raise ``ValueError``
naming the field before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simgen.acquisition import AcquisitionConfig
from simgen.configbase import Config
from simgen.distributions import Distribution
from simgen.optics import OpticsConfig

MODELS = ("auto", "incoherent", "prism", "multislice", "pointsum")


def _default_defects() -> dict:
    return {"vac_X1": 0.04, "vac_X2": 0.01, "vac_M": 0.01}


@dataclass(frozen=True)
class StructureConfig(Config):
    """What is simulated: material, alloy, defects, orientation (lengths in Å).

    ``material`` may be a distribution over formulas (``{choice: [MoS2, WSe2]}``).
    ``defects`` maps defect kind -> concentration per eligible site (each may be drawn).
    ``file`` simulates a user's own cell (any format ASE reads) instead of the builder.
    """

    material: Distribution = Distribution("fixed", ("MoS2",))
    metals: dict | None = None
    chalcogens: dict | None = None
    rotation_deg: Distribution = Distribution("uniform", (0.0, 60.0))
    displacement_sigma_A: Distribution = Distribution("fixed", (0.01,))
    margin_A: float = 8.0
    defects: dict = field(default_factory=_default_defects)
    defects_by: str = "concentration"
    substituent: str | None = None
    dopant: str = "Re"
    complex_size: int = 1
    file: str | None = None

    def __post_init__(self):
        from structures import DEFECT_KINDS, make_composition, parse_material

        for value in self.material.args:
            if self.metals is None or self.chalcogens is None:
                try:
                    parse_material(value)
                except ValueError as err:
                    raise ValueError(f"structure.material: {err}") from None
        if self.metals is not None or self.chalcogens is not None:
            try:
                make_composition(self.material.args[0], self.metals, self.chalcogens)
            except ValueError as err:
                raise ValueError(f"structure.{err}") from None
        self.displacement_sigma_A.check_range("structure.displacement_sigma_A", 0.0, 0.5)
        if self.margin_A < 0:
            raise ValueError(f"structure.margin_A: must be >= 0, got {self.margin_A}")
        if self.defects_by not in ("concentration", "exact"):
            raise ValueError(
                "structure.defects_by: expected 'concentration' or 'exact', got "
                f"{self.defects_by!r}"
            )
        parsed = {}
        for kind, value in (self.defects or {}).items():
            if kind not in DEFECT_KINDS:
                raise ValueError(
                    f"structure.defects: unknown defect kind {kind!r}; expected one of "
                    f"{DEFECT_KINDS}"
                )
            dist = Distribution.parse(value, f"structure.defects.{kind}")
            dist.check_range(f"structure.defects.{kind}", 0.0, 1.0)
            parsed[kind] = dist
        object.__setattr__(self, "defects", parsed)
        if not 1 <= self.complex_size <= 3:
            raise ValueError(f"structure.complex_size: expected 1..3, got {self.complex_size}")
        from ase.data import chemical_symbols

        from structures import CHALCOGENS

        if self.dopant not in chemical_symbols[1:]:
            raise ValueError(
                f"structure.dopant: {self.dopant!r} is not an element symbol (e.g. Re, Nb, V)"
            )
        if self.substituent is not None and self.substituent not in CHALCOGENS:
            raise ValueError(
                f"structure.substituent: expected a chalcogen {tuple(CHALCOGENS)}, got "
                f"{self.substituent!r}"
            )

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["defects"] = {k: v.to_config() for k, v in self.defects.items()}
        return d


#: Frozen-phonon configurations of the calibration references of a detector grid
#: (drawn detector angles; ``simulation.calibration_frozen_phonons: null``).
GRID_FROZEN_PHONONS = 8


@dataclass(frozen=True)
class SimulationConfig(Config):
    """Which image model runs, where, and its numerical settings.

    ``model="auto"`` runs ``prism`` on a GPU and the calibrated ``incoherent`` model on a
    CPU-only machine. ``pointsum`` is the textbook Z^n point-sum model (no channelling, no
    calibration; :func:`simgen.incoherent.pointsum_calibration`), a foreign physics for
    robustness tests; ``pointsum_exponent`` is its n.

    ``calibration_frozen_phonons`` is the number of frozen-phonon configurations of the
    incoherent model's calibration references: ``None`` (default) takes 0 for a fixed
    detector (the shipped calibrations) and :data:`GRID_FROZEN_PHONONS` when the detector
    angles are drawn (a static lattice misstates how the contrast changes with the
    detector: Se2/W 15 % low at 80 mrad, docs/physics.md).
    """

    model: str = "auto"
    device: str = "auto"
    prism_interpolation: int = 2
    frozen_phonons: int = 0
    potential_sampling_A: float = 0.05
    transmission_supersampling: int = 4
    calibration_reference: str = "prism"
    calibration_frozen_phonons: int | None = None
    pointsum_exponent: float = 2.0

    def __post_init__(self):
        if not 1.0 <= self.pointsum_exponent <= 3.0:
            raise ValueError(
                f"simulation.pointsum_exponent: expected 1..3, got {self.pointsum_exponent}"
            )
        if self.model not in MODELS:
            raise ValueError(f"simulation.model: expected one of {MODELS}, got {self.model!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"simulation.device: expected auto, cpu or gpu, got {self.device!r}")
        if self.prism_interpolation < 1:
            raise ValueError(
                f"simulation.prism_interpolation: expected >= 1, got {self.prism_interpolation}"
            )
        if self.frozen_phonons < 0:
            raise ValueError(f"simulation.frozen_phonons: expected >= 0, got {self.frozen_phonons}")
        if not 0.005 <= self.potential_sampling_A <= 0.2:
            raise ValueError(
                "simulation.potential_sampling_A: expected 0.005..0.2 Å, got "
                f"{self.potential_sampling_A}"
            )
        if not 1 <= self.transmission_supersampling <= 16:
            raise ValueError(
                "simulation.transmission_supersampling: expected an integer 1..16, got "
                f"{self.transmission_supersampling}"
            )
        n_fp = self.calibration_frozen_phonons
        if n_fp is not None and (
            isinstance(n_fp, bool) or not isinstance(n_fp, int) or not 0 <= n_fp <= 64
        ):
            raise ValueError(
                f"simulation.calibration_frozen_phonons: expected an integer 0..64 or null, "
                f"got {n_fp!r}"
            )
        if self.calibration_reference not in ("prism", "multislice"):
            raise ValueError(
                "simulation.calibration_reference: expected prism or multislice, got "
                f"{self.calibration_reference!r}"
            )


@dataclass(frozen=True)
class LabelsConfig(Config):
    """Label scheme and mask rasterisation (disk radius in Å)."""

    scheme: str | dict = "defects"
    disk_radius_A: float = 0.7

    def __post_init__(self):
        from structures import get_scheme

        try:
            get_scheme(self.scheme)
        except ValueError as err:
            raise ValueError(f"labels.{err}") from None
        if not 0.05 <= self.disk_radius_A <= 3.0:
            raise ValueError(f"labels.disk_radius_A: expected 0.05..3 Å, got {self.disk_radius_A}")


@dataclass(frozen=True)
class DatasetConfig(Config):
    """How many samples, of what size, from which seed."""

    n_samples: int = 256
    image_size: tuple[int, int] = (256, 256)
    seed: int = 0
    samples_per_chunk: int = 1
    #: Consecutive samples per task (a multiple of ``samples_per_chunk``); None: 8 for the
    #: fast models (incoherent, pointsum), ``samples_per_chunk`` for abTEM's.
    samples_per_task: int | None = None

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"dataset.n_samples: expected >= 1, got {self.n_samples}")
        if len(self.image_size) != 2 or min(self.image_size) < 16 or max(self.image_size) > 8192:
            raise ValueError(
                f"dataset.image_size: expected [height, width] in 16..8192 px, got "
                f"{list(self.image_size)}"
            )
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if self.seed < 0:
            raise ValueError(f"dataset.seed: expected >= 0, got {self.seed}")
        if self.samples_per_chunk < 1:
            raise ValueError(
                f"dataset.samples_per_chunk: expected >= 1, got {self.samples_per_chunk}"
            )
        t = self.samples_per_task
        if t is not None and (t < 1 or t % self.samples_per_chunk):
            raise ValueError(
                f"dataset.samples_per_task: expected a positive multiple of samples_per_chunk "
                f"({self.samples_per_chunk}), got {t}"
            )


@dataclass(frozen=True)
class SimgenConfig(Config):
    """Everything that defines a dataset."""

    structure: StructureConfig = field(default_factory=StructureConfig)
    optics: OpticsConfig = field(default_factory=OpticsConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


DEFAULT_CONFIG_FILE = Path(__file__).parent / "data" / "default.yaml"


def load_config(path: str | Path | None = None) -> SimgenConfig:
    """Load a YAML config (default: the shipped annotated default)."""
    return SimgenConfig.load(path or DEFAULT_CONFIG_FILE)
