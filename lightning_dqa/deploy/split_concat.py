"""A convolution that reads a channel concatenation, split into one convolution per part (the banded runtime).

``conv(cat([a, b], dim=1))`` equals ``conv_a(a) + conv_b(b)``, where ``conv_a`` holds the columns of the weight
that read ``a``'s channels (and the bias) and ``conv_b`` those that read ``b``'s. A quantizer acts on each
channel alone, so the layer's quantizer on the concatenation is its quantizer on ``a``'s channels and on
``b``'s (:func:`~lightning_dqa.core.shared.channel_quantizer`, bit for bit). Run in bands, the split needs no
concatenated band (a copy of both parts' rows) and lets each part's rows be decoded, convolved and dropped before
the next part's are: a U-Net's decoder convolution reads its upsampled input and its skip one after the other.

The sums differ from the whole convolution's in the order they are added, so the output may differ in the last
bits of a value (exactly equal when every product and partial sum is exact, e.g. with dyadic weights and codes).

:func:`split_concat_convs` rewrites a traced graph in place; :func:`lightning_dqa.run_banded` calls it
(``split_concat=True``, the default). The model itself is not changed: the part convolutions are new modules of
the trace, with copies of the weight's columns.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from lightning_dqa.core.attach import QUANTIZER_ATTR, _input_hook
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.core.shared import channel_quantizer

__all__ = ["split_concat_convs"]


def split_concat_convs(
    gm: fx.GraphModule,
    readers: dict[fx.Node, str],
    quantizers: dict[str, ActivationQuantizer],
    meta: Mapping[fx.Node, Any],
) -> dict[str, str]:
    """Replace every quantized ``conv(cat(parts, dim=1))`` of ``gm`` by a sum of one convolution per part.

    Only a plain ``nn.Conv2d`` (one group, zero padding, its input quantizer its only hook) whose concatenation
    nothing else reads is split. The part computed last is convolved first (in a band, its rows are the ones
    already live), the earlier ones (a stored skip, decoded when read) after it, each added to the sum.

    Args:
        gm: the trace (:func:`~lightning_dqa.deploy.compressed._trace`); changed in place and recompiled.
        readers: quantized reader node -> layer name; the part convolutions are added, the split ones removed.
        quantizers: layer name -> quantizer; each part's quantizer is added under ``"<layer>[c0:c1]"``.
        meta: node -> its output's shape (a whole run of the trace), for the parts' channel counts.

    Returns:
        Part layer name -> the layer it was split from (empty when nothing was split).

    """
    split: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        parts = _split_parts(gm, node, readers, quantizers, meta)
        if parts is None:
            continue
        layer, m, cat = readers[node], gm.get_submodule(str(node.target)), node.args[0]
        q = quantizers[layer]
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + int(meta[part][1]))
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        latest_first = sorted(range(len(parts)), key=lambda i: -position[parts[i]])
        with gm.graph.inserting_before(node):
            total: fx.Node | None = None
            for k, i in enumerate(latest_first):  # the part computed last first: its band is the one live now
                start, stop = starts[i], starts[i + 1]
                name = f"{layer}[{start}:{stop}]"
                conv = _part_conv(m, start, stop, channel_quantizer(q, start, stop), bias=k == 0)
                target = f"dqa_split_{node.name}_{i}"
                gm.add_submodule(target, conv)
                new = gm.graph.call_module(target, (parts[i],))
                readers[new], quantizers[name], split[name] = name, conv.get_submodule(QUANTIZER_ATTR), layer
                total = new if total is None else gm.graph.call_function(operator.add, (total, new))
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
        gm.graph.erase_node(cat)  # type: ignore[arg-type]
        del readers[node]
    if split:
        gm.recompile()
    return split


def _split_parts(
    gm: fx.GraphModule, node: fx.Node, readers: Mapping[fx.Node, str], quantizers: Mapping[str, ActivationQuantizer],
    meta: Mapping[fx.Node, Any],
) -> list[fx.Node] | None:  # fmt: skip
    """The parts of the concatenation ``node`` convolves, when it is one to split; else ``None``."""
    if node.op != "call_module" or node not in readers or len(node.args) != 1 or node.kwargs:
        return None
    m = gm.get_submodule(str(node.target))
    cat = node.args[0]
    if (
        type(m) is not nn.Conv2d or m.groups != 1 or m.padding_mode != "zeros"
        or list(m._forward_pre_hooks.values()) != [_input_hook] or m._forward_hooks
        or not isinstance(cat, fx.Node) or cat.op != "call_function" or cat.target is not torch.cat
        or len(cat.users) != 1 or set(cat.kwargs) - {"dim"}
    ):  # fmt: skip
        return None
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    parts = cat.args[0]
    q = quantizers[readers[node]]
    if (
        dim not in (1, -3) or not isinstance(parts, list | tuple) or len(parts) < 2
        or not all(isinstance(p, fx.Node) and len(meta.get(p, ())) == 4 for p in parts)
        or q.input_noise() is not None or q.scale_mode == "dynamic" or q.channel_dim % 4 != 1
    ):  # fmt: skip
        return None
    return list(parts)  # type: ignore[arg-type]


def _part_conv(m: nn.Conv2d, start: int, stop: int, q: ActivationQuantizer, bias: bool) -> nn.Conv2d:
    """A convolution of ``m``'s input channels ``start`` to ``stop``, quantizing with ``q``.

    It carries ``m``'s bias when ``bias`` (the first part of the sum), none otherwise.
    """
    conv = nn.Conv2d(
        stop - start, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, bias=bias and m.bias is not None,
        device=m.weight.device, dtype=m.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(m.weight[:, start:stop])
        if conv.bias is not None and m.bias is not None:
            conv.bias.copy_(m.bias)
    conv.requires_grad_(False)
    conv.add_module(QUANTIZER_ATTR, q)
    conv.register_forward_pre_hook(_input_hook)
    return conv.eval()
