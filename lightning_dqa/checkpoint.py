"""Checkpoints with quantizers: layout checks before Lightning restores weights, and restoring outside a Trainer.

Quantizer state lives in the model's ``state_dict`` under ``<layer>.dqa_quantizer.<buffer>``. A checkpoint
either has exactly the layout of the model's quantizers (same layers, channels and widths) or none at all
(a full-precision checkpoint, which is then calibrated afresh); anything else is an error naming the first
layer that differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.attach import QUANTIZER_ATTR, quantizers_of
from lightning_dqa.config import DQAConfig

__all__ = ["CALLBACK_STATE_KEY", "check_quantizer_layout", "load_quantized", "quantizer_keys"]

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


def check_quantizer_layout(model: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Check that a checkpoint's quantizer entries fit ``model``'s installed quantizers.

    Args:
        model: model with quantizers installed.
        state_dict: the checkpoint's model state dict.

    Returns:
        ``True`` when the checkpoint carries quantizer state for every layer, ``False`` when it carries none
        (a full-precision checkpoint).

    Raises:
        ValueError: naming the first layer whose quantizer is missing, unexpected, of another channel count or
            of other bit widths.
    """
    theirs = quantizer_keys(state_dict)
    mine = {name: q.state_dict() for name, q in quantizers_of(model).items()}
    if not theirs:
        return False
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
        for buf, value in mine[name].items():
            other = theirs[name].get(buf)
            if other is None:
                raise ValueError(f"Checkpoint quantizer of layer {name!r} lacks its {buf!r} entry")
            if tuple(other.shape) != tuple(value.shape):
                raise ValueError(
                    f"Checkpoint quantizer layout does not match the model at layer {name!r}: {buf} has shape "
                    f"{tuple(other.shape)} in the checkpoint, {tuple(value.shape)} in the model"
                )
            if buf in ("bits", "extra_bits") and int(other) != int(value):
                raise ValueError(
                    f"Checkpoint quantizer layout does not match the model at layer {name!r}: it was saved with "
                    f"{buf}={int(other)} but the callback asks for {buf}={int(value)}"
                )
    return True


def load_quantized(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    config: DQAConfig | None = None,
    state_dict_prefix: str = "",
) -> nn.Module:
    """Restore a quantized model from a Lightning checkpoint, outside a Trainer.

    The quantizer settings are read from the checkpoint's ``DQACallback`` state unless ``config`` is given;
    quantizers are installed on ``model`` and the whole state dict (weights and quantizer buffers) is
    loaded strictly.

    Args:
        model: a freshly built model of the checkpoint's architecture (e.g. the LightningModule, or its inner
            network together with ``state_dict_prefix="net."``).
        checkpoint: a path or an already loaded checkpoint dict.
        config: the settings; default: those saved by the callback.
        state_dict_prefix: keep only keys starting with it, and strip it.

    Returns:
        ``model``, quantized, in eval mode.

    Raises:
        ValueError: when neither ``config`` nor the checkpoint's callback state gives the settings, or the
            layouts do not match.

    Example:
        >>> model = load_quantized(ImageClassifier(), "last.ckpt")  # doctest: +SKIP
    """
    from lightning_dqa.engine import prepare

    ckpt = (
        torch.load(checkpoint, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, Mapping)
        else checkpoint
    )
    if config is None:
        states = ckpt.get("callbacks", {}) or {}
        saved = next((v for k, v in states.items() if str(k).startswith(CALLBACK_STATE_KEY)), None)
        if saved is None or "config" not in saved:
            raise ValueError(
                "Expected the checkpoint to hold DQACallback state with its config (saved by a Trainer that ran the "
                "callback), found none; pass config=DQAConfig(...) explicitly"
            )
        config = DQAConfig(**saved["config"])
    state: dict[str, Tensor] = {
        k[len(state_dict_prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(state_dict_prefix)
    }
    prepare(model, config)
    if not check_quantizer_layout(model, state):
        raise ValueError("Expected a checkpoint with calibrated quantizer state, found a full-precision checkpoint")
    model.load_state_dict(state, strict=True)
    for q in quantizers_of(model).values():
        q.enabled = bool(q.calibrated)
    return model.eval()
