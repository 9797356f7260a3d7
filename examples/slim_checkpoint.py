"""Strip a Lightning checkpoint down to the network's weights, for committing or shipping.

A Lightning checkpoint holds the optimizer state (momentum, Adam moments) next to the weights, two to three
times their size. This keeps ``net.*`` tensors only (the prefix removed), plus the epoch, step and
hyper-parameters as plain values, and prints the file's size and sha256. The result loads with
``weights_only=True`` through :func:`lightning_dqa.demos.models.load_pretrained`, i.e. the ``weights:`` argument of
:class:`~lightning_dqa.demos.tasks.ImageClassifier` and :class:`~lightning_dqa.demos.tasks.SegmentationModel`.

Usage::

    python examples/slim_checkpoint.py runs/mobilenetv2_cifar10/checkpoints/last.ckpt examples/checkpoints/mbv2.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch


def slim(src: Path, dst: Path, prefix: str = "net.") -> dict[str, object]:
    """Write the ``prefix`` weights of checkpoint ``src`` to ``dst``; returns what was written besides them."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"Expected weights under the prefix {prefix!r} in {src}, found none")
    meta = {
        "source": src.name,
        "epoch": int(checkpoint.get("epoch", -1)),
        "global_step": int(checkpoint.get("global_step", -1)),
        "hyper_parameters": json.dumps(dict(checkpoint.get("hyper_parameters", {})), default=str, sort_keys=True),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, dst)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a Lightning .ckpt")
    parser.add_argument("dst", type=Path, help="where to write the weights")
    parser.add_argument("--prefix", default="net.", help="the LightningModule attribute holding the network")
    args = parser.parse_args()
    meta = slim(args.src, args.dst, args.prefix)
    digest = hashlib.sha256(args.dst.read_bytes()).hexdigest()
    size = args.dst.stat().st_size / 2**20
    print(f"{args.dst}: {size:.2f} MiB, sha256 {digest}, epoch {meta['epoch']}, step {meta['global_step']}")


if __name__ == "__main__":
    main()
