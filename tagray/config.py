"""Typed configs: frozen dataclasses filled from YAML files and `key=value` overrides.

Each stage owns one dataclass whose field defaults are the only place a default is
defined; YAML files in `configs/`, `tune_configs/` and `serve_configs/` override
fields. Unknown keys and wrong types are errors that name the file and the key.

tagray's own `configs/*.yaml` and `tune_configs/*.yaml` are package data (`tagray/configs/`,
`tagray/tune_configs/`, read through `importlib.resources`), so an installed wheel finds them
without a checkout: a config
name that is not a file here (`rlr.yaml`, or `configs/rlr.yaml` as the README writes it)
is looked up there.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

C = TypeVar("C")

# The configs that ship with tagray (package data; a Path for every installed or editable copy).
CONFIG_DIR: Traversable = files("tagray") / "configs"
# How the README and the YAML headers name them: `--config configs/rlr.yaml` works from any
# directory that has no `configs/rlr.yaml` of its own.
CONFIG_PREFIX = "configs"
# The sweeps (`tagray tune --config tune_configs/neighbors.yaml`) ship too: in a wheel or a
# container image there is no checkout to read them from.
PACKAGED_FOLDERS = {CONFIG_PREFIX: CONFIG_DIR, "tune_configs": files("tagray") / "tune_configs"}


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def resolve_config_path(name: str | Path | Traversable) -> Path | Traversable:
    """The config file `name`: the path as given when it is a file (relative to the working
    directory), else the packaged config of that name (`rlr.yaml`, `configs/rlr.yaml`,
    `tune_configs/neighbors.yaml`)."""
    if not isinstance(name, (str, Path)):  # already a packaged resource (CONFIG_DIR / "x.yaml")
        if name.is_file():
            return name
        raise ConfigError(f"config file {name} not found")
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute():
        parts = PurePosixPath(path.as_posix()).parts
        folder = PACKAGED_FOLDERS.get(parts[0], CONFIG_DIR) if parts else CONFIG_DIR
        if parts[:1] and parts[0] in PACKAGED_FOLDERS:
            parts = parts[1:]
        candidate = folder.joinpath(*parts) if parts else None
        if candidate is not None and candidate.is_file():
            return candidate
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"config file {name} not found in {Path.cwd()}, and this tagray install lacks its own "
                          f"configs ({CONFIG_DIR}): reinstall tagray from a wheel built with its package data")
    shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml")))
    raise ConfigError(f"config file {name} not found (looked in {Path.cwd()} and in tagray's own configs: {shipped})")


def load_yaml(path: str | Path | Traversable) -> dict[str, Any]:
    """A YAML mapping from `path` (empty file → empty mapping)."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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


def coerce_fields(cls: type, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`data`'s values as fields of dataclass `cls` take them (YAML lists → tuples, ints → floats,
    nested dataclasses built), checking names and types but not building `cls`; names `source`
    in errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
            f"expected some of: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    return {name: _coerce(value, hints[name], f"{source}: {name}") for name, value in data.items()}


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default as dataclass `cls` declares it (`default`, or `default_factory()`),
    without building `cls` (whose checks may refuse its own defaults, e.g. an empty sweep)."""
    out = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Builds dataclass `cls` from `data`, checking names and types; names `source` in errors."""
    kwargs = coerce_fields(cls, data, source)
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
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # nan passes every `x <= 0` range check and inf trains to a NaN model: refuse both here
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
