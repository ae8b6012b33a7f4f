"""Run configs: typed dataclasses, loadable from YAML and overridable with `key=value` strings.

Every stage defines a dataclass for its run config; `load_config(Cls, yaml_path, overrides)` builds it,
checks the types and returns it. Nested dataclasses are addressed with dots: `optim.lr=3e-4`.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nanor1.common import NanoR1Error

T = TypeVar("T")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise a one-line error naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        for a in args:
            try:
                return _coerce(value, a, name)
            except NanoR1Error:
                continue
        raise NanoR1Error(f"config {name}: {value!r} is not a valid {tp}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise NanoR1Error(f"config {name}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else str
        out = [_coerce(v, inner, name) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise NanoR1Error(f"config {name}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise NanoR1Error(f"config {name}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise NanoR1Error(f"config {name}: {value!r} is not one of {[e.value for e in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise NanoR1Error(f"config {name}: {value!r} is not a boolean (use true/false)")
    if tp in (int, float):
        if isinstance(value, bool):
            raise NanoR1Error(f"config {name}: {value!r} is not a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise NanoR1Error(f"config {name}: {value!r} is not a number") from None
        if tp is int:
            if f != int(f):
                raise NanoR1Error(f"config {name}: {value!r} is not a whole number")
            return int(f)
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise NanoR1Error(f"config {name}: expected text, got {value!r}")
        return str(value)
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise NanoR1Error(f"config: unknown key(s) {sorted(prefix + u for u in unknown)}; "
                          f"known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON/YAML-able data (enums as values)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def describe(cfg: Any) -> list[str]:
    """`key=default` for every setting of a config, nested ones as dotted keys (what a stage's --help lists)."""
    def flat(data: Any, prefix: str) -> list[str]:
        if isinstance(data, dict) and data:
            return [line for k, v in data.items() for line in flat(v, f"{prefix}{k}.")]
        shown = data if isinstance(data, str) and data else yaml.safe_dump(data, default_flow_style=True).strip()
        return [f"{prefix[:-1]}={shown.removesuffix(chr(10) + '...').strip()}"]
    return flat(to_dict(cfg), "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings onto a nested dict (values parsed as YAML scalars)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise NanoR1Error(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: T | None = None) -> T:
    """Dataclass `cls` from defaults (or `base`), then a YAML file, then `key=value` overrides."""
    data: dict = to_dict(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise NanoR1Error(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise NanoR1Error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise NanoR1Error(f"{path}: the top level must be a mapping of config keys")
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    from nanor1.common import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
