"""The argument checks written once: whether a value is an integer that is not a bool.

``isinstance(True, int)`` holds in Python, so every argument that must be an integer is checked with
:func:`is_int`, and the callers keep their own messages (which name the argument, the rule and the value).

>>> is_int(3), is_int(True), is_int(3.0)
(True, False, False)
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["is_int"]


def is_int(value: Any, numpy: bool = False) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (``numpy=True``: any integral scalar, e.g. ``np.int64``)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral if numpy else int)
