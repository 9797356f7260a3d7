"""The deployment artifact: everything a runtime needs to store activations the DQA way, as one JSON file.

Format (``"format": "lightning-dqa/1"``)::

    {
      "format": "lightning-dqa/1",
      "config": {...DQAConfig fields...},
      "layers": [
        {
          "name": "net.layer1.0.conv1",    # qualified module name
          "where": "input",                # the layer's input or output is quantized
          "channel_dim": 1,                # channel axis of that tensor
          "channels": 16,
          "bits": 4,                       # n: width of every stored main code (0: left in full precision)
          "extra_bits": 3,                 # m: shifting-error width of important channels
          "signed": false,                 # two's-complement codes, or unsigned
          "scale_mode": "static",          # static/learnable: "scales" below; dynamic: max|x| per channel at run time
          "scales": [0.031, ...],          # n-bit scale per channel; important channels use scale / 2**m
          "important": [0, 5, 9, ...],     # channel indices quantized at n+m bits and shifted
          "codebook_lengths": [1, 3, ...], # canonical Huffman code length of each shifting error 0..2**m-1
          "codebook_hex": "..."            # the same code book serialized (HuffmanCodebook.to_bytes)
        }, ...
      ]
    }

A runtime stores, per layer: ``q = round(x / s)`` clamped to ``n`` bits for ordinary channels; for important
channels ``Q = round(x * 2**m / s)`` clamped to ``n + m`` bits, ``q = Q >> m`` and the Huffman-coded
``e = Q & (2**m - 1)``. It reads back ``s * q`` or ``s * (q + e / 2**m)``. Scales are written as decimal
floats that round-trip float32 exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dqa.attach import find_quant_points, quantizers_of
from lightning_dqa.codec import HuffmanCodebook
from lightning_dqa.config import DQAConfig

__all__ = ["FORMAT", "apply_artifact", "export_artifact", "load_artifact"]

FORMAT = "lightning-dqa/1"


def export_artifact(model: nn.Module, path: str | Path, config: DQAConfig) -> dict[str, Any]:
    """Write the artifact of a calibrated model to ``path`` (JSON) and return it as a dict.

    Raises:
        ValueError: when a quantizer is not calibrated yet.
    """
    points = {p.name: p for p in find_quant_points(model, config)}
    layers = []
    for name, q in quantizers_of(model).items():
        if not bool(q.calibrated):
            raise ValueError(f"Layer {name!r} is not calibrated; calibrate before exporting")
        book = HuffmanCodebook.from_counts(q.error_counts.cpu())
        layers.append(
            {
                "name": name,
                "where": points[name].where if name in points else config.where,
                "channel_dim": q.channel_dim,
                "channels": q.num_channels,
                "bits": q.n,
                "extra_bits": q.m,
                "signed": bool(q.signed),
                "scale_mode": q.scale_mode,
                "scales": None if q.scale_mode == "dynamic" else [float(s) for s in q.scale.detach().abs().cpu()],
                "important": torch.nonzero(q.important.cpu()).flatten().tolist(),
                "codebook_lengths": book.lengths.tolist(),
                "codebook_hex": book.to_bytes().hex(),
            }
        )
    artifact = {"format": FORMAT, "config": config.to_dict(), "layers": layers}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(artifact, indent=1))
    return artifact


def load_artifact(path: str | Path) -> dict[str, Any]:
    """Read and check an artifact written by :func:`export_artifact`.

    Raises:
        ValueError: for another format or a malformed layer entry.
    """
    artifact = json.loads(Path(path).read_text())
    if artifact.get("format") != FORMAT:
        raise ValueError(f"Expected an artifact of format {FORMAT!r}, got {artifact.get('format')!r}")
    for layer in artifact["layers"]:
        scales = layer["scales"]
        if scales is not None and len(scales) != layer["channels"]:
            raise ValueError(f"Layer {layer['name']!r}: {len(scales)} scales for {layer['channels']} channels")
    return artifact


def apply_artifact(model: nn.Module, path: str | Path) -> nn.Module:
    """Install quantizers on a fresh ``model`` and set them from an artifact (outside any Trainer).

    Raises:
        ValueError: when the artifact's layers do not match the model's (naming the first one that differs).
    """
    from lightning_dqa.engine import prepare

    artifact = load_artifact(path)
    config = DQAConfig(**artifact["config"])
    quantizers = prepare(model, config)
    by_name = {layer["name"]: layer for layer in artifact["layers"]}
    for name, q in quantizers.items():
        layer = by_name.get(name)
        if layer is None or layer["channels"] != q.num_channels or layer["bits"] != q.n:
            raise ValueError(f"Artifact does not match the model at layer {name!r}")
        q.signed.fill_(bool(layer["signed"]))
        if layer["scales"] is not None:
            q.set_static_scale(torch.tensor(layer["scales"], dtype=torch.float32))
        q.important.zero_()
        q.important[torch.tensor(layer["important"], dtype=torch.long)] = True
        # The code book is what is stored; counts equal to 2**(max_len - len) rebuild the same canonical book.
        lengths = torch.tensor(layer["codebook_lengths"], dtype=torch.int64)
        q.error_counts.copy_(torch.pow(2, lengths.max() - lengths))
        q.calibrated.fill_(True)
        q.enabled = True
    return model.eval()
