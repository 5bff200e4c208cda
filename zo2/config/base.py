"""Shared helpers for the typed config dataclasses: validation with messages that name the field."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from zo2.errors import ConfigError


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix for an unknown name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def require(cond: bool, field: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming ``field`` and its bad ``value`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"Invalid config value {field} = {value!r}: {why}")


def require_choice(field: str, value: Any, options: Iterable[Any]) -> None:
    options = list(options)
    if value not in options:
        hint = did_you_mean(str(value), [str(o) for o in options])
        raise ConfigError(
            f"Invalid config value {field} = {value!r}: it must be one of "
            f"{', '.join(repr(o) for o in options)}.{hint}"
        )
