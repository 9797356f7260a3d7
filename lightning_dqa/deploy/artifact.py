"""Write a calibrated model's artifact, read one, apply one to a fresh model (format: :mod:`._schema`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_dqa.codec import HuffmanCodebook
from lightning_dqa.core.attach import find_quant_points, prepare, quantizers_of
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.deploy._atomic import all_or_nothing, prefixed
from lightning_dqa.deploy._schema import FORMAT, check_artifact, parse_artifact, read_artifact

__all__ = ["apply_artifact", "export_artifact", "load_artifact"]


def _layer_entry(name: str, where: str, q: Any) -> dict[str, Any]:
    """One layer: its name and place, the quantizer's own entry, and the code book of its error counts."""
    book = HuffmanCodebook.from_counts(q.error_counts.cpu())
    return {
        "name": name,
        "where": where,
        **q.artifact_entry(),
        "codebook_lengths": book.lengths.tolist(),
        "codebook_hex": book.to_bytes().hex(),
    }


def export_artifact(model: nn.Module, path: str | Path, config: DQAConfig) -> dict[str, Any]:
    """Write the artifact of a calibrated model to ``path`` (JSON) and return it as a dict.

    The artifact is checked against ``model`` by the same rules :func:`apply_artifact` uses before it is
    written, so a file this writes always applies; it is written to a temporary file first and renamed.

    Args:
        model: a model with calibrated quantizers installed by ``config``.
        path: the JSON file to write (parent folders are created).
        config: the settings the quantizers were installed with.

    Returns:
        The artifact (format :data:`FORMAT`).

    Raises:
        ValueError: when a quantizer is not calibrated yet, or the model's state breaks a rule of the format
            (e.g. a non-finite scale).
    """
    points = {p.name: p for p in find_quant_points(model, config)}
    layers = []
    for name, q in quantizers_of(model).items():
        if not bool(q.calibrated):
            raise ValueError(f"Layer {name!r} is not calibrated; calibrate before exporting")
        layers.append(_layer_entry(name, points[name].where if name in points else config.where, q))
    artifact = {"format": FORMAT, "config": config.to_dict(), "layers": layers}
    check_artifact(model, artifact)
    text = json.dumps(artifact, indent=1, allow_nan=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return artifact


def load_artifact(path: str | Path) -> dict[str, Any]:
    """Read an artifact written by :func:`export_artifact` and check its top level.

    The per-layer rules need the model; :func:`apply_artifact` checks them.

    Raises:
        ValueError: for another format, a malformed or oversized file.
    """
    return read_artifact(path)


def _from_mapping(artifact: Mapping[str, Any]) -> dict[str, Any]:
    """A dict artifact through the same JSON rules as a file (a copy: the caller's dict is not kept)."""
    try:
        text = json.dumps(artifact)
    except RecursionError:
        raise ValueError("Artifact: expected JSON nested a few levels deep, got nesting too deep to read") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"Artifact: expected a dict of JSON values, got one that is not: {err!r}") from None
    return parse_artifact(text)


def apply_artifact(
    model: nn.Module, artifact: str | Path | Mapping[str, Any], state_dict_prefix: str = ""
) -> nn.Module:
    """Install quantizers on a fresh ``model`` and set them from an artifact (outside any Trainer).

    Everything is checked before ``model`` is touched; if installing still fails, ``model`` is restored
    exactly (its submodules, hooks and attributes).

    Args:
        model: the network the artifact was exported from, freshly built (weights are not touched).
        artifact: the JSON file, or an artifact already loaded as a dict.
        state_dict_prefix: where ``model`` sits in the exported module, e.g. ``"net."`` to apply a
            LightningModule's artifact onto its inner network ``net`` (as in :func:`lightning_dqa.load_quantized`).

    Returns:
        ``model``, quantized as exported, in eval mode.

    Raises:
        ValueError: naming the layer, the field, the rule and the value, for any malformed artifact or one
            that does not match the model (layers missing on either side, other channel counts or widths).

    Example::

        net = apply_artifact(TinyNet(), "dqa.json")
    """
    view = prefixed(model, state_dict_prefix)
    data = _from_mapping(artifact) if isinstance(artifact, Mapping) else read_artifact(artifact)
    config, checked = check_artifact(view, data)
    with all_or_nothing(model, tensors=False):
        quantizers = prepare(view, config)
        if list(quantizers) != list(checked):
            raise RuntimeError(f"Installed quantizers {list(quantizers)} differ from the checked {list(checked)}")
        for name, q in quantizers.items():
            q.load_artifact_entry(checked[name])
        model.eval()
    return model
