"""Reading and checking artifacts: every rule is checked before a model is touched.

:func:`read_artifact` parses the file (size, encoding, nesting, duplicate keys, top-level shape);
:func:`check_artifact` checks it against a model: the config, the set of layers, and each layer's entry
through the quantizer that would hold it (:meth:`~.ActivationQuantizer.check_artifact_entry`)
plus the code book fields written here. Every failure is a ``ValueError`` naming the layer, the field, the
rule and the value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_dqa.codec import MAX_CODE_LENGTH, HuffmanCodebook
from lightning_dqa.core._fields import fail, read_int_list, show
from lightning_dqa.core.attach import QuantPoint, build_quantizers, find_quant_points
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["FORMAT", "FORMATS", "MAX_BYTES", "check_artifact", "read_artifact", "template_quantizers"]

FORMAT = "lightning-dqa/2"
FORMAT_V1 = "lightning-dqa/1"
FORMATS: tuple[str, ...] = (FORMAT, FORMAT_V1)
MAX_BYTES = 256 * 2**20  # far above any real network's artifact (a few bytes per channel)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"Artifact: expected JSON objects without duplicate keys, got {dup!r} twice")
    return dict(pairs)


def parse_artifact(text: str | bytes) -> dict[str, Any]:
    """Parse artifact JSON and check its top level: ``format``, a ``config`` object and a ``layers`` list.

    Raises:
        ValueError: for text that is too large, not UTF-8, not JSON, nested too deeply, or of another shape.
    """
    if len(text) > MAX_BYTES:
        raise ValueError(f"Artifact: expected at most {MAX_BYTES} bytes, got {len(text)}")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("Artifact: expected JSON nested a few levels deep, got nesting too deep to read") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Artifact: expected UTF-8 JSON, got a parse error: {err}") from None
    check_top_level(data)
    return data


def check_top_level(data: Any) -> None:
    """Raise ``ValueError`` unless ``data`` is ``{"format": one of FORMATS, "config": {...}, "layers": [{...}]}``."""
    if not isinstance(data, dict):
        raise fail("top level", "the document", "a JSON object", type(data).__name__)
    if data.get("format") not in FORMATS:
        raise fail("top level", "format", f"one of {list(FORMATS)}", data.get("format"))
    if not isinstance(data.get("config"), dict):
        raise fail("top level", "config", "a JSON object of DQAConfig fields", data.get("config"))
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise fail("top level", "layers", "a non-empty JSON list", layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            raise fail("top level", f"layers[{i}]", "a JSON object with a string 'name'", layer)


def read_artifact(path: str | Path) -> dict[str, Any]:
    """Read an artifact file and check its top level (see :func:`parse_artifact`).

    Raises:
        ValueError: for a malformed file.
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"Artifact: expected at most {MAX_BYTES} bytes, got {path.stat().st_size} in {str(path)!r}")
    return parse_artifact(path.read_bytes())


def read_config(data: Mapping[str, Any]) -> DQAConfig:
    """The artifact's ``config`` as a validated :class:`DQAConfig`.

    Raises:
        ValueError: for an unknown field or a value ``DQAConfig`` rejects.
    """
    try:
        return DQAConfig(**data["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"Artifact config: {err}") from None


def template_quantizers(points: list[QuantPoint], config: DQAConfig) -> dict[str, ActivationQuantizer]:
    """Uncalibrated quantizers, as :func:`lightning_dqa.core.attach.prepare` would install them, but not installed."""
    return {p.name: q for p, q in zip(points, build_quantizers(points, config), strict=True)}


def _code_lengths(layer: Mapping[str, Any], m: int, owner: str) -> list[int]:
    """``codebook_lengths``: ``2**m`` ints in ``[1, 16]`` forming a prefix code (Kraft sum at most 1)."""
    lengths = read_int_list(layer, "codebook_lengths", owner, 1, MAX_CODE_LENGTH, length=2**m)
    kraft = sum(2 ** (MAX_CODE_LENGTH - n) for n in lengths)
    if kraft > 2**MAX_CODE_LENGTH:
        raise fail(owner, "codebook_lengths", "the lengths of a prefix code (Kraft sum of 2**-len <= 1)", lengths)
    return lengths


def check_codebook(layer: Mapping[str, Any], counts: Tensor, m: int, owner: str) -> None:
    """``codebook_lengths`` and ``codebook_hex`` must be the code book of the layer's ``error_counts``.

    Raises:
        ValueError: naming the field and the rule.
    """
    lengths = _code_lengths(layer, m, owner)
    book = HuffmanCodebook.from_counts(counts)
    if lengths != book.lengths.tolist():
        raise fail(owner, "codebook_lengths", f"the code book of error_counts, {book.lengths.tolist()}", lengths)
    if layer.get("codebook_hex") != book.to_bytes().hex():
        raise fail(owner, "codebook_hex", f"{book.to_bytes().hex()!r} (those code lengths)", layer.get("codebook_hex"))


def _upgrade_v1(layer: dict[str, Any], config: DQAConfig, owner: str) -> dict[str, Any]:
    """A format-1 entry with the ``error_counts`` its code lengths imply (``2**(max_len - len)``)."""
    if config.method == "noisyquant":
        raise ValueError(
            f"Artifact {owner}: format {FORMAT_V1!r} did not record NoisyQuant's noise, so it cannot be applied "
            f"exactly; re-export it with this version (format {FORMAT!r})"
        )
    lengths = np.asarray(_code_lengths(layer, int(config.extra_bits), owner), dtype=np.int64)
    return {**layer, "error_counts": (2 ** (lengths.max() - lengths)).tolist()}


def _check_layer(
    layer: dict[str, Any], q: ActivationQuantizer, config: DQAConfig, where: str, v1: bool
) -> dict[str, Tensor]:
    """One layer's entry against its template quantizer and the config; returns the tensors to load."""
    owner = f"layer {q.name!r}"
    if layer.get("where") != where:
        raise fail(owner, "where", f"{where!r} (the config's)", layer.get("where"))
    if v1:
        layer = _upgrade_v1(layer, config, owner)
    checked = q.check_artifact_entry(layer, owner)
    check_codebook(layer, checked["error_counts"], int(checked.get("extra_bits", q.m)), owner)
    code = {"signed": True, "unsigned": False}.get(config.code)
    if code is not None and layer["signed"] is not code:
        raise fail(owner, "signed", f"{str(code).lower()} (config code={config.code!r})", layer["signed"])
    if config.effective_ratio == 0 and layer["important"]:
        raise fail(owner, "important", f"empty (method {config.method!r}, ratio {config.ratio})", layer["important"])
    return checked


def check_artifact(model: nn.Module, data: Mapping[str, Any]) -> tuple[DQAConfig, dict[str, dict[str, Tensor]]]:
    """Check a parsed artifact against ``model`` (with its prefix already applied); nothing is changed.

    Args:
        model: the module whose qualified layer names are the artifact's.
        data: the artifact, as :func:`parse_artifact` returns it.

    Returns:
        ``(config, {layer: tensors to load})``, layers in the model's order.

    Raises:
        ValueError: naming the layer, the field, the rule and the value, when a layer is missing on either
            side or appears twice, or any entry breaks a rule.
    """
    check_top_level(data)
    config = read_config(data)
    templates = template_quantizers(find_quant_points(model, config), config)
    names = [layer["name"] for layer in data["layers"]]
    for name in names:
        if names.count(name) > 1:
            raise fail(f"layer {name!r}", "name", "unique among layers", f"{names.count(name)} entries")
        if name not in templates:
            raise fail(
                f"layer {name!r}",
                "name",
                f"a target layer of the model, one of {show(list(templates))} (for an inner network, pass "
                f"state_dict_prefix, e.g. 'net.')",
                name,
            )
    missing = [n for n in templates if n not in names]
    if missing:
        rule = f"an entry for every target layer of the model; {missing} lack one"
        raise fail("layers", "the layer list", rule, names)
    by_name = {layer["name"]: layer for layer in data["layers"]}
    v1 = data["format"] == FORMAT_V1
    checked = {n: _check_layer(by_name[n], q, config, config.where, v1) for n, q in templates.items()}
    return config, checked
