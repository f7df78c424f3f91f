"""Schema fields that carry their own checks: ``setting(default, rule, ...)`` declares a field's default and
what a value must satisfy, beside the field. ``check_fields`` runs every rule and names the key at fault."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import field
from typing import Any

from dino_train.runtime.errors import ConfigError

__all__ = ["ConfigError"]

Rule = Callable[[Any], str | None]  # returns what is wrong with a value, or None


def setting(default: Any, *rules: Rule) -> Any:
    """A dataclass field with a default (lists and dicts are copied per instance) and its rules."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"rules": rules})
    return field(default=default, metadata={"rules": rules})


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be positive, got {v}"


def at_least(lo: float) -> Rule:
    return lambda v: None if v >= lo else f"must be at least {lo:g}, got {v}"


def in_range(lo: float, hi: float, hi_open: bool = False) -> Rule:
    """lo <= v <= hi (or < hi when ``hi_open``)."""

    def rule(v: float) -> str | None:
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must lie in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v}"

    return rule


def required(v: str) -> str | None:
    return None if v != "" else "is required"


def crop_scale(scale: tuple[float, float]) -> str | None:
    lo, hi = scale
    if not (0 < lo <= 1 and 0 < hi <= 1):
        return f"crop scales must lie in (0, 1], got {list(scale)}"
    return None if lo <= hi else f"lower scale {lo} is above upper scale {hi}"


def each(rule: Rule) -> Rule:
    """Apply ``rule`` to every element of a tuple."""

    def check(values: tuple) -> str | None:
        return next((f"{v}: {msg}" for v in values if (msg := rule(v))), None)

    return check


def finite(v: float) -> bool:
    return math.isfinite(v)


def check_fields(section: Any, prefix: str = "") -> None:
    """Run each field's rules on ``section`` (a schema dataclass) and its nested sections."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        for rule in f.metadata.get("rules", ()):
            problem = rule(value)
            if problem:
                raise ConfigError(f"{key}: {problem}")
