"""Typed configs: frozen dataclasses filled from YAML files and `key=value` overrides.

Each stage owns one dataclass whose field defaults are the only place a default is
defined; YAML files in `configs/`, `tune_configs/` and `serve_configs/` override
fields. Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def resolve_config_path(name: str | Path) -> Path:
    """A config path as given, else relative to the project's `configs/` folder."""
    path = Path(name)
    if path.exists():
        return path
    candidate = CONFIG_DIR / path
    if candidate.exists():
        return candidate
    raise ConfigError(f"config file {name} not found (looked in . and {CONFIG_DIR})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path` (empty file → empty mapping)."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["lr=0.1", "name=x"]` → `{"lr": 0.1, "name": "x"}` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value) if value else None
    return out


def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Builds dataclass `cls` from `data`, checking names and types; names `source` in errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
            f"expected some of: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{source}: {name}") for name, value in data.items()}
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e
    return cfg


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """Defaults of `cls`, then the YAML at `path`, then `overrides` (later wins)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data.update(load_yaml(path))
        source = str(resolve_config_path(path))
    if overrides:
        data.update(overrides)
        source = f"{source} + command-line overrides"
    return from_dict(cls, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML-able data."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} does not fit {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
