"""Defective 2H TMD monolayer supercells with every projected column labelled.

Pure builders: functions return ``ase.Atoms``-based objects and tables, never touch files.
"""

from structures.columns import (
    DEFECT_CLASSES,
    HOST_CLASSES,
    ColumnTable,
    LabelScheme,
    column_table,
    columns_from_atoms,
    composition_string,
    defect_classes,
    get_scheme,
    parse_composition,
)
from structures.defects import DEFECT_KINDS, apply_defects
from structures.lattices import (
    CHALCOGENS,
    LATTICE_TABLE,
    METALS,
    Composition,
    lattice_parameters,
    make_composition,
    parse_material,
)
from structures.supercell import CHALCOGEN, METAL, Monolayer, SiteTable, build_monolayer

__all__ = [
    "CHALCOGEN",
    "CHALCOGENS",
    "DEFECT_CLASSES",
    "DEFECT_KINDS",
    "HOST_CLASSES",
    "LATTICE_TABLE",
    "METAL",
    "METALS",
    "ColumnTable",
    "Composition",
    "LabelScheme",
    "Monolayer",
    "SiteTable",
    "apply_defects",
    "build_monolayer",
    "column_table",
    "columns_from_atoms",
    "composition_string",
    "defect_classes",
    "get_scheme",
    "lattice_parameters",
    "make_composition",
    "parse_composition",
    "parse_material",
]
