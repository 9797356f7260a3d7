"""All-or-nothing model changes, and a model seen under a state-dict prefix.

Loading an artifact or a checkpoint installs quantizers (submodules and hooks) and writes tensors. Both are
validated before the model is touched; :func:`all_or_nothing` is the second line of defence: if the change
still fails half way, every module's attributes, submodules, hooks and (optionally) tensors are put back
exactly as they were.

Example:
    >>> from torch import nn
    >>> inner = nn.Sequential(nn.Conv2d(3, 4, 1))
    >>> [n for n, _ in prefixed(inner, "net.").named_modules()]
    ['', 'net', 'net.0']
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["all_or_nothing", "check_prefix", "prefixed"]


def check_prefix(prefix: str) -> list[str]:
    """The module names in a state-dict prefix such as ``"net."`` or ``"model.backbone."`` (``""``: none).

    Raises:
        ValueError: when ``prefix`` is not a string of dot-terminated, non-empty module names.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"Expected state_dict_prefix to be a string such as 'net.', got {prefix!r}")
    if prefix == "":
        return []
    parts = prefix.split(".")
    if parts[-1] != "" or any(p == "" for p in parts[:-1]):
        raise ValueError(
            f"Expected state_dict_prefix to be '' or module names each followed by a dot (e.g. 'net.'), got {prefix!r}"
        )
    return parts[:-1]


def prefixed(model: nn.Module, prefix: str) -> nn.Module:
    """``model`` wrapped in plain containers so that its names carry ``prefix`` (``model`` itself for ``""``).

    The containers only hold references: installing quantizers through them changes ``model``'s own
    modules, and target-layer patterns (``include``/``exclude``) see the same names as on the full model.

    Raises:
        ValueError: for a malformed prefix (see :func:`check_prefix`).
    """
    view = model
    for part in reversed(check_prefix(prefix)):
        outer = nn.Module()
        outer.add_module(part, view)
        view = outer
    return view


_Saved = tuple[dict[str, Any], dict[str, tuple[dict[Any, Any], dict[Any, Any]]]]


def _copy_attributes(module: nn.Module) -> _Saved:
    """``module.__dict__``, and a one-level copy of each dict in it (submodules, buffers, hooks)."""
    dicts = {k: (v, dict(v)) for k, v in module.__dict__.items() if isinstance(v, dict)}
    return dict(module.__dict__), dicts


def _restore_attributes(module: nn.Module, saved: _Saved) -> None:
    """Put back what :func:`_copy_attributes` saw, refilling the same dict objects (hook handles keep them)."""
    attributes, dicts = saved
    module.__dict__.clear()
    module.__dict__.update(attributes)
    for original, content in dicts.values():
        original.clear()
        original.update(content)


@contextmanager
def all_or_nothing(model: nn.Module, tensors: bool = True) -> Iterator[None]:
    """Undo every change to ``model`` made inside the block when the block raises.

    Args:
        model: the module about to change.
        tensors: also snapshot the values of every parameter and buffer (a copy of the model's state) and
            write them back on failure; needed when the block loads weights in place.

    Raises:
        Whatever the block raises, after the model was restored.
    """
    saved = [(m, _copy_attributes(m)) for m in model.modules()]
    values: list[tuple[Tensor, Tensor]] = []
    if tensors:
        values = [(t, t.detach().clone()) for t in model.state_dict(keep_vars=True).values()]
    try:
        yield
    except BaseException:
        for module, attributes in saved:
            _restore_attributes(module, attributes)
        with torch.no_grad():
            for tensor, value in values:
                tensor.copy_(value)
        raise
