"""Frozen, validated settings objects round-tripped through plain dicts and YAML.

Each stage keeps one frozen dataclass deriving from :class:`Config`. Validation
lives in ``__post_init__`` and raises ``ValueError`` naming the offending field
(:func:`check_range` and :func:`check_pair` for numbers, ``Distribution.check_range``
for drawn values); unknown keys are refused by :meth:`Config.from_dict` with the list of
valid ones. Fields annotated as :class:`~simgen.distributions.Distribution` accept a number
or a ``{kind: args}`` mapping. :func:`described` gives a field a one-line help text (for
annotated YAML templates). ``--set key=value`` overrides go through :func:`parse_overrides`
and :meth:`Config.with_overrides`, for every CLI.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Self

import yaml

from simgen.distributions import Distribution


def described(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field carrying a one-line help text (``metadata["help"]``)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


def check_range(name: str, value, low=None, high=None, *, low_open=False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high`` (``<`` with
    ``low_open``); a bound of None is no bound."""
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ValueError(f"{name}: must be {op} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value!r}")


def check_pair(name: str, pair, *, integer=False, low=None) -> None:
    """Raise ``ValueError`` unless ``pair`` is None or ``[low, high]`` numbers with
    ``low <= high`` (integers with ``integer``; both ``>= low`` when given)."""
    if pair is None:
        return
    if len(pair) != 2:
        raise ValueError(f"{name}: expected two numbers [low, high], got {list(pair)}")
    kinds = (int,) if integer else (int, float)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in pair):
        what = "integers" if integer else "numbers"
        raise ValueError(f"{name}: expected two {what}, got {list(pair)}")
    if pair[0] > pair[1]:
        raise ValueError(f"{name}: low must be <= high, got {list(pair)}")
    if low is not None and pair[0] < low:
        raise ValueError(f"{name}: values must be >= {low}, got {list(pair)}")


def _is_config_type(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _convert(value: Any, tp, name: str):
    """Convert a plain value to the annotated field type (nested configs, tuples...)."""
    origin = typing.get_origin(tp)
    if tp is Distribution:
        return Distribution.parse(value, name)
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return tp.from_dict(value, _prefix=name)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(value, args[0], name)
        return value
    if origin is tuple:
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if origin is dict:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _plain(value: Any):
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, Distribution):
        return value.to_config()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: frozen dataclass with dict/YAML round trips and strict keys."""

    @classmethod
    def from_dict(cls, data: dict | None, *, _prefix: str = "") -> Self:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{_prefix}." if _prefix else ""
            raise ValueError(
                f"unknown key {where}{unknown[0]!s}; valid keys here: {', '.join(sorted(fields))}"
            )
        kwargs = {}
        for key, value in data.items():
            name = f"{_prefix}.{key}" if _prefix else key
            kwargs[key] = _convert(value, hints[key], name)
        try:
            return cls(**kwargs)
        except ValueError as err:
            msg = str(err)
            if _prefix and not msg.startswith(_prefix):
                msg = f"{_prefix}.{msg}"
            raise ValueError(msg) from None

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> Self:
        """Return a copy with some fields changed (validated again)."""
        data = self.to_dict()
        data.update({k: _plain(v) for k, v in changes.items()})
        return type(self).from_dict(data)

    def with_overrides(self, overrides: dict[str, Any]) -> Self:
        """Apply ``{"optics.semiangle_mrad": 25, ...}`` (dotted keys) and validate again.

        Raises
        ------
        ValueError
            A key whose first part is not a field (``unknown key a.b; valid keys here:
            ...``), or an invalid value.
        """
        data = self.to_dict()
        for dotted, value in overrides.items():
            if dotted.split(".")[0] not in data:
                raise ValueError(
                    f"unknown key {dotted}; valid keys here: {', '.join(sorted(data))}"
                )
            set_by_path(data, dotted, value)
        return type(self).from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Self:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config is not valid YAML: {err}") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError("config must be a YAML mapping at top level")
        return cls.from_dict(data or {})

    @classmethod
    def load_with_overrides(
        cls,
        path: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        direct: dict[str, Any] | None = None,
    ) -> Self:
        """Load ``path`` (or the defaults), then apply ``--set key=value`` strings and
        ``direct`` ``{"a.b": value}`` settings (None values skipped), and validate."""
        base = cls.load(path) if path is not None else cls()
        changes = parse_overrides(overrides)
        changes.update({k: v for k, v in (direct or {}).items() if v is not None})
        return base.with_overrides(changes) if changes else base

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        return cls.from_yaml(path.read_text())


def parse_overrides(items) -> dict[str, Any]:
    """``["optics.C10_A=5", "dataset.image_size=[64, 64]"]`` -> ``{key: YAML value}``."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(
                f"--set: expected KEY=VALUE (e.g. optics.semiangle_mrad=25), got {item!r}"
            )
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: value is not valid YAML: {value!r}") from None
    return out


def set_by_path(data: dict, dotted: str, value: Any) -> dict:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'`` (creating mappings)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {key} is not a mapping")
    node[keys[-1]] = value
    return data
