"""Checkpoints with quantizers: layout checks before Lightning restores weights, and restoring outside a Trainer.

Quantizer state lives in the model's ``state_dict`` under ``<layer>.dqa_quantizer.<buffer>``. A checkpoint
either has exactly the layout of the model's quantizers (same layers, channels and widths) or none at all
(a full-precision checkpoint, which is then calibrated afresh); anything else is an error naming the first
layer that differs.

:func:`load_quantized` reads files with ``torch.load(weights_only=True)`` (a checkpoint that needs arbitrary
unpickling is refused, never run), checks the checkpoint's schema, keys, shapes and quantizer layout before
the model is touched, and restores the model exactly if loading still fails.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.core.attach import QUANTIZER_ATTR, find_quant_points, prepare, quantizers_of
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.widths import MAX_EXTRA_BITS, WIDTHS
from lightning_dqa.deploy._atomic import all_or_nothing, prefixed
from lightning_dqa.deploy._schema import template_quantizers

__all__ = [
    "CALLBACK_STATE_KEY",
    "check_checkpoint_keys",
    "check_quantizer_layout",
    "load_quantized",
    "quantizer_keys",
    "read_checkpoint",
    "saved_config",
]

CALLBACK_STATE_KEY = "DQACallback"
_MARK = f".{QUANTIZER_ATTR}."


def quantizer_keys(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Quantizer entries of a state dict grouped by layer: ``{layer: {buffer: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if _MARK in key:
            layer, buf = key.split(_MARK, 1)
            out.setdefault(layer, {})[buf] = value
    return out


def _compare_layout(
    mine: Mapping[str, Mapping[str, Tensor]],
    theirs: Mapping[str, Mapping[str, Any]],
    allocated: frozenset[str] = frozenset(),
) -> None:
    """Raise ``ValueError`` naming the first layer whose quantizer entries differ in presence, shape or width.

    Layers in ``allocated`` take their widths from the checkpoint (chosen under a budget): those must be in range
    and the error histogram must have ``2**extra_bits`` entries.
    """
    for name in sorted(set(mine) | set(theirs), key=lambda n: (n not in mine, n)):
        if name not in theirs:
            raise ValueError(
                f"Checkpoint quantizer layout does not match the model: layer {name!r} has a quantizer in the "
                f"model but none in the checkpoint"
            )
        if name not in mine:
            raise ValueError(
                f"Checkpoint quantizer layout does not match the model: layer {name!r} has a quantizer in the "
                f"checkpoint but none in the model (check layer_types/include/exclude/where)"
            )
        extra = sorted(set(theirs[name]) - set(mine[name]))
        if extra:
            raise ValueError(f"Checkpoint quantizer of layer {name!r} has unexpected entries {extra}")
        flexible = _allocated_widths(name, theirs[name]) if name in allocated else ()
        for buf, value in mine[name].items():
            if buf not in flexible:
                _compare_buffer(name, buf, value, theirs[name].get(buf))


def _allocated_widths(name: str, theirs: Mapping[str, Any]) -> tuple[str, ...]:
    """Check a budget-allocated layer's saved widths; returns the buffers whose values may differ from the model's."""
    values = {}
    for buf, lo, hi in (("bits", min(WIDTHS), max(WIDTHS)), ("extra_bits", 0, MAX_EXTRA_BITS)):
        t = theirs.get(buf)
        if not isinstance(t, Tensor) or t.shape != () or t.dtype != torch.int64 or not lo <= int(t) <= hi:
            raise ValueError(
                f"Checkpoint quantizer of layer {name!r}: expected {buf} to be an int64 scalar in [{lo}, {hi}] "
                f"(a width chosen under target_bits), got {t!r}"
            )
        values[buf] = int(t)
    counts = theirs.get("error_counts")
    if not isinstance(counts, Tensor) or tuple(counts.shape) != (2 ** values["extra_bits"],):
        shape = tuple(counts.shape) if isinstance(counts, Tensor) else counts
        raise ValueError(
            f"Checkpoint quantizer of layer {name!r}: expected error_counts of shape ({2 ** values['extra_bits']},) "
            f"for extra_bits={values['extra_bits']}, got {shape}"
        )
    return ("bits", "extra_bits", "error_counts")


def _compare_buffer(name: str, buf: str, value: Tensor, other: Any) -> None:
    if other is None:
        raise ValueError(f"Checkpoint quantizer of layer {name!r} lacks its {buf!r} entry")
    if not isinstance(other, Tensor):
        raise ValueError(f"Checkpoint quantizer of layer {name!r}: expected {buf} to be a tensor, got {type(other)}")
    if tuple(other.shape) != tuple(value.shape):
        raise ValueError(
            f"Checkpoint quantizer layout does not match the model at layer {name!r}: {buf} has shape "
            f"{tuple(other.shape)} in the checkpoint, {tuple(value.shape)} in the model"
        )
    if other.dtype != value.dtype:
        raise ValueError(
            f"Checkpoint quantizer of layer {name!r}: expected {buf} of dtype {value.dtype}, got {other.dtype}"
        )
    if buf == "bits" and int(other) == 0 and other.shape == ():
        return  # a layer calibration left in full precision (never reached, e.g. an attention out_proj)
    if buf in ("bits", "extra_bits") and int(other) != int(value):
        raise ValueError(
            f"Checkpoint quantizer layout does not match the model at layer {name!r}: it was saved with "
            f"{buf}={int(other)} but the callback asks for {buf}={int(value)}"
        )


def check_quantizer_layout(model: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Check that a checkpoint's quantizer entries fit ``model``'s installed quantizers.

    Args:
        model: model with quantizers installed.
        state_dict: the checkpoint's model state dict.

    Returns:
        ``True`` when the checkpoint carries quantizer state for every layer, ``False`` when it carries none
        (a full-precision checkpoint).

    Raises:
        ValueError: naming the first layer whose quantizer is missing, unexpected, of another channel count,
            dtype or bit widths.
    """
    theirs = quantizer_keys(state_dict)
    if not theirs:
        return False
    quantizers = quantizers_of(model)
    allocated = frozenset(name for name, q in quantizers.items() if q.allocated)
    _compare_layout({name: q.state_dict() for name, q in quantizers.items()}, theirs, allocated)
    return True


def check_checkpoint_keys(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> bool:
    """Check a checkpoint against a model with quantizers installed, before Lightning loads it non-strictly.

    Args:
        model: the model, quantizers installed.
        state_dict: the checkpoint's state dict.
        strict: also require every other key to match (a full-precision checkpoint may lack the quantizers').

    Returns:
        Whether the checkpoint carries quantizer state (see :func:`check_quantizer_layout`).

    Raises:
        ValueError: for a quantizer layout that does not fit.
        RuntimeError: with ``strict``, naming missing and unexpected keys, as ``load_state_dict`` would.

    """
    has_quantizers = check_quantizer_layout(model, state_dict)
    if strict:
        mine = model.state_dict().keys()
        missing = [k for k in mine if k not in state_dict and (has_quantizers or _MARK not in k)]
        unexpected = [k for k in state_dict if k not in mine]
        if missing or unexpected:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}"
            )
    return has_quantizers


def read_checkpoint(checkpoint: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Args:
        checkpoint: a path, or an already loaded checkpoint (returned as is).

    Returns:
        The checkpoint mapping.

    Raises:
        ValueError: when the file holds other objects (a pickle that could run code is refused, not run) or
            is not a mapping with a ``state_dict`` mapping of tensors.
    """
    if isinstance(checkpoint, str | os.PathLike):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(
                f"Refused to load {str(checkpoint)!r}: it holds objects that torch.load(weights_only=True) does not "
                f"allow, and unpickling them could run arbitrary code ({first}). Load it yourself only if you "
                f"trust it, and pass the dict"
            ) from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected the checkpoint to be a mapping, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"Expected the checkpoint's 'state_dict' to be a mapping of tensors, got {type(state)}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(
                f"Expected the checkpoint's state_dict to map names to tensors, got {key!r}: {type(value).__name__}"
            )
    return checkpoint


def saved_config(checkpoint: Mapping[str, Any]) -> DQAConfig:
    """The :class:`DQAConfig` the callback saved in a checkpoint.

    Raises:
        ValueError: when the checkpoint holds no callback config, or one ``DQAConfig`` rejects.
    """
    states = checkpoint.get("callbacks") or {}
    saved = None
    if isinstance(states, Mapping):
        saved = next((v for k, v in states.items() if str(k).startswith(CALLBACK_STATE_KEY)), None)
    if not isinstance(saved, Mapping) or not isinstance(saved.get("config"), Mapping):
        raise ValueError(
            "Expected the checkpoint to hold DQACallback state with its config (saved by a Trainer that ran the "
            "callback), found none; pass config=DQAConfig(...) explicitly"
        )
    try:
        return DQAConfig(**saved["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"Checkpoint callback config: {err}") from None


def _check_weights(view: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The checkpoint's non-quantizer entries must be exactly the model's, of the same shapes."""
    mine = {k: v for k, v in view.state_dict().items() if _MARK not in k}
    theirs = {k: v for k, v in state.items() if _MARK not in k}
    missing, unexpected = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not fit the model: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in mine.items():
        if tuple(theirs[key].shape) != tuple(value.shape):
            raise ValueError(
                f"Checkpoint does not fit the model at {key!r}: shape {tuple(theirs[key].shape)} in the checkpoint, "
                f"{tuple(value.shape)} in the model"
            )


def load_quantized(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    config: DQAConfig | None = None,
    state_dict_prefix: str = "",
) -> nn.Module:
    """Restore a quantized model from a Lightning checkpoint, outside a Trainer.

    The quantizer settings are read from the checkpoint's ``DQACallback`` state unless ``config`` is given.
    A file is read with ``torch.load(weights_only=True)``. Everything is checked before ``model`` is touched
    (keys, shapes, quantizer layout); then quantizers are installed and the whole state dict (weights and
    quantizer buffers) is loaded strictly. If that still fails, ``model`` is restored exactly.

    Args:
        model: a freshly built model of the checkpoint's architecture (e.g. the LightningModule, or its inner
            network together with ``state_dict_prefix="net."``).
        checkpoint: a path or an already loaded checkpoint dict.
        config: the settings; default: those saved by the callback.
        state_dict_prefix: where ``model`` sits in the checkpoint: keep only keys starting with it (module
            names each followed by a dot, e.g. ``"net."``); layer patterns see the prefixed names.

    Returns:
        ``model``, quantized, in eval mode.

    Raises:
        ValueError: when the file is refused by ``weights_only``, the checkpoint is malformed, neither
            ``config`` nor the checkpoint gives the settings, or the layouts do not match.

    Example::

        model = load_quantized(ImageClassifier(), "last.ckpt")
    """
    view = prefixed(model, state_dict_prefix)
    ckpt = read_checkpoint(checkpoint)
    config = saved_config(ckpt) if config is None else config
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(state_dict_prefix)}
    theirs = quantizer_keys(state)
    if not theirs:
        raise ValueError("Expected a checkpoint with calibrated quantizer state, found a full-precision checkpoint")
    templates = template_quantizers(find_quant_points(view, config), config)
    _compare_layout({name: q.state_dict() for name, q in templates.items()}, theirs)
    _check_weights(view, state)
    with all_or_nothing(model, tensors=True):
        prepare(view, config)
        view.load_state_dict(state, strict=True)
        for q in quantizers_of(view).values():
            q.enabled = bool(q.calibrated)
        model.eval()
    return model
