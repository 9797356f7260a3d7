"""The label-free objective: how far the quantized model's outputs move from the full-precision model's.

Calibration often has no labels (unlabeled images, a detection or regression model whose targets the
callback cannot read), and on the network's own training images the label loss is nearly zero, so it hardly
tells layers apart. The output objective needs neither: the quantized model should reproduce the FP32 model's
outputs. Per sample ``i`` and output leaf (every floating-point tensor of a tensor, tuple, list or dict output)
the divergence is

* ``kl``: ``KL(softmax(f_i) || softmax(q_i))`` over the class axis (axis 1), averaged over the other axes
  (e.g. the pixels of a segmentation map): for logits;
* ``mse``: the mean over the sample's elements of ``(q_i - f_i)^2``: for dense or regression outputs, boxes;

and the objective is the sum over samples and leaves (:func:`output_divergence`). ``auto`` takes ``kl`` for a
leaf of shape ``(N, C)`` with ``C >= 2`` (a classifier's logits) and ``mse`` for every other leaf.

Gradient rankings and the memory budget need the *curvature* of this objective, not its value: at the FP32
point it is zero with a zero gradient, and its Hessian with respect to an output is the Fisher information of
the softmax (``kl``) or ``2 / M`` times the identity (``mse``, ``M`` elements per sample). :func:`fisher_probe`
returns a scalar whose gradient ``g`` has ``E[g g^T]`` equal to that Hessian, pulled back to every activation:
cross-entropy against classes sampled from the FP32 softmax for ``kl`` leaves (the true Fisher, not the
empirical one), and the inner product with Gaussian noise scaled by ``sqrt(2 / M)`` for ``mse`` leaves (a
Hutchinson probe of the Gauss-Newton matrix). The squared activation gradients the ``fisher`` statistics sum
are then unbiased estimates of the second-order loss increase that :mod:`~lightning_dqa.calibration.allocation`
prices.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten_with_path

__all__ = ["DIVERGENCES", "Divergence", "fisher_probe", "leaf_kinds", "output_divergence", "output_leaves"]

Divergence = Literal["auto", "kl", "mse"]
DIVERGENCES: tuple[str, ...] = ("auto", "kl", "mse")


def output_leaves(output: Any) -> list[tuple[str, Tensor]]:
    """The floating-point tensors of a model output with their paths, e.g. ``[("[0]['boxes']", t), ...]``.

    Integer and boolean tensors (detected classes, masks) and non-tensors are left out.

    >>> [p for p, _ in output_leaves({"logits": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)})]
    ["['logits']"]

    """
    leaves, _ = tree_flatten_with_path(output)
    out = []
    for path, leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            out.append(("".join(str(k) for k in path) or "output", leaf))
    return out


def _kind(t: Tensor, divergence: str) -> str:
    if divergence != "auto":
        return divergence
    return "kl" if t.ndim == 2 and t.shape[1] >= 2 else "mse"


def leaf_kinds(output: Any, divergence: Divergence = "auto") -> dict[str, str]:
    """Which divergence each floating-point leaf gets, by path (for the calibration summary)."""
    _check(divergence)
    return {path: _kind(t, divergence) for path, t in output_leaves(output)}


def _check(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"Expected output_divergence to be one of {list(DIVERGENCES)}, got {divergence!r}")


def _class_rows(t: Tensor) -> Tensor:
    """``(N, C, *S)`` as ``(N * prod(S), C)``: one row of class scores per sample and position."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _require_kl_shape(path: str, t: Tensor) -> None:
    if t.ndim < 2 or t.shape[1] < 2:
        raise ValueError(
            f"Output leaf {path} of shape {tuple(t.shape)} has no class axis (axis 1 with at least 2 classes) for "
            f"output_divergence='kl'; use 'mse' or 'auto'"
        )


def fisher_probe(output: Any, divergence: Divergence = "auto", generator: torch.Generator | None = None) -> Tensor:
    """A scalar whose activation gradients, squared, estimate the output objective's curvature (module docstring).

    Args:
        output: the FP32 model's output for a batch (tensors, tuples, lists, dicts; the first axis of every
            leaf is the sample axis); it must carry the autograd graph to the activations.
        divergence: ``auto``, ``kl`` or ``mse`` (module docstring).
        generator: the random source of the sampled classes and the Gaussian probes; on the output's device.

    Returns:
        A 0-dim tensor (``0`` with no graph when every leaf is empty, e.g. a detector that found nothing).

    Raises:
        ValueError: when the output holds no floating-point tensor, or a ``kl`` leaf has no class axis.

    """
    _check(divergence)
    leaves = output_leaves(output)
    if not leaves:
        raise ValueError(
            f"The output objective found no floating-point tensor in a model output of type {type(output).__name__} "
            f"to compare with full precision; pass objective='training_step' or 'cross_entropy', or override "
            f"DQACallback.calibration_loss"
        )
    total: Tensor | None = None
    for path, t in leaves:
        if t.numel() == 0:
            continue
        if _kind(t, divergence) == "kl":
            _require_kl_shape(path, t)
            rows = _class_rows(t.float())
            with torch.no_grad():
                sampled = torch.multinomial(rows.softmax(dim=1), 1, generator=generator).squeeze(1)
            positions = rows.shape[0] // t.shape[0]  # averaged over positions: scaled by 1/sqrt(P)
            term = F.cross_entropy(rows, sampled, reduction="sum") / math.sqrt(positions)
        else:
            per_sample = t[0].numel() if t.ndim else 1
            noise = torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)
            term = (t.float() * noise).sum() * math.sqrt(2.0 / per_sample)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=leaves[0][1].device)
    return total


def output_divergence(reference: Any, output: Any, divergence: Divergence = "auto") -> Tensor:
    """The output objective's value: the divergence of ``output`` from ``reference``, summed over samples.

    Args:
        reference: the FP32 model's output for a batch.
        output: the quantized model's output for the same batch, of the same structure and shapes.
        divergence: ``auto``, ``kl`` or ``mse`` (module docstring).

    Returns:
        A 0-dim float tensor, ``>= 0``.

    Raises:
        ValueError: when the two outputs differ in structure or in a leaf's shape (e.g. a detector that found
            another number of boxes), or a ``kl`` leaf has no class axis.

    """
    _check(divergence)
    ref, out = output_leaves(reference), output_leaves(output)
    if [p for p, _ in ref] != [p for p, _ in out]:
        raise ValueError(
            f"The output objective compares outputs of the same structure; the full-precision output has leaves "
            f"{[p for p, _ in ref]}, the quantized one {[p for p, _ in out]}"
        )
    total = torch.zeros((), device=out[0][1].device if out else None)
    for (path, f), (_, q) in zip(ref, out, strict=True):
        if f.shape != q.shape:
            raise ValueError(
                f"Output leaf {path} has shape {tuple(f.shape)} in full precision and {tuple(q.shape)} quantized; "
                f"the output objective compares tensors of one shape"
            )
        if f.numel() == 0:
            continue
        if _kind(f, divergence) == "kl":
            _require_kl_shape(path, f)
            rf, rq = _class_rows(f.float()), _class_rows(q.float())
            kl = F.kl_div(rq.log_softmax(dim=1), rf.log_softmax(dim=1), log_target=True, reduction="sum")
            total = total + kl / (rf.shape[0] // f.shape[0])
        else:
            per_sample = f[0].numel() if f.ndim else 1
            total = total + (q.float() - f.float()).square().sum() / per_sample
    return total
