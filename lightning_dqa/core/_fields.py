"""Strict readers of JSON values: each failure is a ``ValueError`` naming the owner, the field, the rule and the value.

Used by the quantizers' artifact entries (:meth:`.quantizers.ActivationQuantizer.check_artifact_entry`)
and by :mod:`lightning_dqa.deploy.artifact`. JSON has no types beyond bool, number, string, list and object, so the
rules are spelled out here once: a bool must be a JSON ``true``/``false`` (not ``"false"``, not ``0``), an int
must not be a bool or a float, a float must be a finite number.

Example:
    >>> read_int({"bits": 4}, "bits", "layer 'conv1'", lo=0, hi=8)
    4
    >>> read_bool({"signed": "false"}, "signed", "layer 'conv1'")
    Traceback (most recent call last):
    ...
    ValueError: Artifact layer 'conv1': expected signed to be a JSON bool (true/false), got 'false'

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["fail", "read_bool", "read_float", "read_float_list", "read_int", "read_int_list", "show"]

_SHOW_CHARS = 80


def show(value: Any) -> str:
    """``repr(value)``, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS]}... ({len(text)} characters)"


def fail(owner: str, name: str, rule: str, value: Any) -> ValueError:
    """The error for field ``name`` of ``owner`` (e.g. ``"layer 'conv1'"``) breaking ``rule``."""
    return ValueError(f"Artifact {owner}: expected {name} to be {rule}, got {show(value)}")


def _get(entry: Mapping[str, Any], name: str, owner: str) -> Any:
    if name not in entry:
        raise fail(owner, name, "present", "nothing (the field is missing)")
    return entry[name]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_bool(entry: Mapping[str, Any], name: str, owner: str) -> bool:
    """``entry[name]``, a JSON bool.

    Raises:
        ValueError: when it is missing or not ``True``/``False``.
    """
    value = _get(entry, name, owner)
    if not isinstance(value, bool):
        raise fail(owner, name, "a JSON bool (true/false)", value)
    return value


def read_int(entry: Mapping[str, Any], name: str, owner: str, lo: int, hi: int) -> int:
    """``entry[name]``, an int in ``[lo, hi]`` (not a bool, not a float).

    Raises:
        ValueError: when it is missing, of another type or out of range.
    """
    value = _get(entry, name, owner)
    if not _is_int(value) or not lo <= value <= hi:
        raise fail(owner, name, f"an int in [{lo}, {hi}]", value)
    return int(value)


def read_float(entry: Mapping[str, Any], name: str, owner: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``entry[name]``, a finite number in ``[lo, hi]``.

    Raises:
        ValueError: when it is missing, not a finite number or out of range.
    """
    value = _get(entry, name, owner)
    if not _is_number(value) or not lo <= value <= hi:
        raise fail(owner, name, f"a finite number in [{lo}, {hi}]", value)
    return float(value)


def _list(entry: Mapping[str, Any], name: str, owner: str, length: int | None) -> list[Any]:
    value = _get(entry, name, owner)
    if not isinstance(value, list):
        raise fail(owner, name, "a JSON list", value)
    if length is not None and len(value) != length:
        raise fail(owner, name, f"a list of {length} entries", f"{len(value)} entries")
    return value


def read_float_list(
    entry: Mapping[str, Any], name: str, owner: str, length: int, positive: bool = False
) -> list[float]:
    """``entry[name]``, a list of ``length`` finite numbers (``> 0`` each with ``positive``).

    Raises:
        ValueError: naming the first bad entry.
    """
    values = _list(entry, name, owner, length)
    rule = "finite positive numbers" if positive else "finite numbers"
    for i, v in enumerate(values):
        if not _is_number(v) or (positive and not v > 0):
            raise fail(owner, f"{name}[{i}]", f"one of {length} {rule}", v)
    return [float(v) for v in values]


def read_int_list(
    entry: Mapping[str, Any], name: str, owner: str, lo: int, hi: int, length: int | None = None
) -> list[int]:
    """``entry[name]``, a list of ints in ``[lo, hi]`` (of ``length`` entries when given).

    Raises:
        ValueError: naming the first bad entry.
    """
    values = _list(entry, name, owner, length)
    for i, v in enumerate(values):
        if not _is_int(v) or not lo <= v <= hi:
            raise fail(owner, f"{name}[{i}]", f"an int in [{lo}, {hi}]", v)
    return [int(v) for v in values]
