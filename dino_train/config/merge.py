"""Three layers merged once: the schema defaults < a recipe yaml < ``section.key=value`` overrides (values
read as YAML). Every key and value is type-checked against the schema as it is merged; errors name the
key (and the file)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dino_train.config.fields import ConfigError


def _scalar(value: Any, tp: type, key: str) -> Any:
    """bool, int, float or str; an int is a fine float, and a float may come as a string ("1e-3", which
    YAML 1.1 reads as a string). Non-finite numbers are impossible values for every setting."""
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is float and not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{key}: expected {names[tp]}, got {value!r}")


def _sequence(value: Any, tp: Any, key: str) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
    if args[-1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _union(value: Any, tp: Any, key: str) -> Any:
    for arg in typing.get_args(tp):
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: {value!r} is not {tp}")


def _literal(value: Any, tp: Any, key: str) -> Any:
    allowed = typing.get_args(tp)
    if value not in allowed or isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def _mapping(value: Any, tp: Any, key: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
    for k, v in value.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}.{k}: must be a finite number, got {v!r}")
    return dict(value)


_BY_ORIGIN = {
    tuple: _sequence,
    typing.Union: _union,
    types.UnionType: _union,
    typing.Literal: _literal,
    dict: _mapping,
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotated type ``tp``."""
    handler = _BY_ORIGIN.get(typing.get_origin(tp))
    if handler is not None:
        return handler(value, tp, key)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp in (bool, int, float, str):
        return _scalar(value, tp, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


@dataclasses.dataclass(frozen=True)
class _OverrideText:
    """A command-line value: its text, and the text read as YAML. A plain-string setting takes the text as
    typed (a path such as ``runs/a: b`` or ``runs/exp #3`` is a mapping or a comment to YAML, and
    ``data.path=2024`` a number), unless it is quoted; every other setting takes the YAML reading."""

    raw: str
    parsed: Any

    def for_type(self, tp: Any) -> Any:
        quoted = len(self.raw) >= 2 and self.raw[0] == self.raw[-1] and self.raw[0] in "'\""
        return self.raw if tp is str and not quoted else self.parsed


def _has_override(value: Any) -> bool:
    return isinstance(value, _OverrideText) or (
        isinstance(value, dict) and any(_has_override(v) for v in value.values())
    )


def _unwrap(value: Any) -> Any:
    """A mapping built from a command-line key path, with each value read as YAML (inside a mapping
    setting no schema type says otherwise)."""
    if isinstance(value, _OverrideText):
        return value.parsed
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise ConfigError(f"unknown key {key!r}; known keys here: {known}")
        if isinstance(value, _OverrideText):
            value = value.for_type(hints[name])
        elif typing.get_origin(hints[name]) is dict and _has_override(value):
            # ``model.timm_kwargs.depth=4`` sets one entry and keeps the others (the YAML's ``num_heads``);
            # ``model.timm_kwargs={depth: 4}`` still replaces the whole mapping.
            value = {**getattr(section, name), **_unwrap(value)}
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
            _apply(getattr(section, name), value, f"{key}.")
        else:
            setattr(section, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], the value); the value is read as YAML, and the schema's
    type decides what it must be (a plain-string setting takes the text as typed: ``_OverrideText``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = None if raw.strip()[:1] in "'\"[{" else raw  # only a string setting may take it
        if value is None:
            raise ConfigError(f"{key}: cannot read value {raw!r} as YAML") from None
    return key.strip().split("."), _OverrideText(raw, value)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def merge_into(cfg: Any, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Merge a yaml file and ``key=value`` overrides into the dataclass instance ``cfg``, checking every key
    and type. Returns ``cfg``."""
    if path is not None:
        try:
            _apply(cfg, _read_yaml(Path(path)), "")
        except ConfigError as err:  # named once: the reader's own errors start with the path already
            raise (err if str(err).startswith(str(path)) else ConfigError(f"{path}: {err}")) from None
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "")
    return cfg


def plain(value: Any) -> Any:
    """Dataclasses, tuples and dicts as plain dicts and lists: what YAML and torch.load(weights_only)
    round-trip."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(x) for k, x in value.items()}
    if isinstance(value, list | tuple):
        return [plain(x) for x in value]
    return value


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
