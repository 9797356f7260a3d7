"""Which loss drives the callback's gradient rankings and memory budget, and how it is computed.

``DQACallback(objective=...)``:

``auto`` (default)
    the module's own ``training_step`` loss when it gives a usable one, else ``output``.
``training_step``
    the loss the user's ``training_step(batch, batch_idx)`` returns (a tensor, or a dict with ``loss``): a
    regression model ranks channels by its own MSE, a detector by its own loss dict. An error when unusable.
``cross_entropy``
    cross-entropy of the output's logits against the batch's integer class targets (the 0.2 default).
``output``
    the label-free objective of :mod:`lightning_dqa.calibration.objectives`: how far the quantized outputs move
    from the FP32 outputs (KL for logits, MSE for dense outputs, per output leaf); needs no targets.

``training_step`` is called as Lightning calls it (the batch on the module's device, ``batch_idx``), with three
differences that keep calibration from changing the model or the run: ``self.log``/``self.log_dict`` do
nothing; the random number generators are forked and seeded; and the module runs in its *training control
flow* with evaluation numerics: every module with submodules is in train mode (a torchvision detector returns
its losses), while normalization, dropout, stochastic depth, attention and every leaf module are in eval mode
(running statistics are used and never updated, nothing is dropped). A module that optimizes manually
(``automatic_optimization=False``) is never called: its ``training_step`` steps its optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_dqa.calibration.objectives import Divergence, fisher_probe, output_leaves
from lightning_dqa.core.attach import QUANTIZER_ATTR
from lightning_dqa.integration.data import primary_output

__all__ = ["Objective", "training_control_flow"]

Split = Callable[[Any], tuple[Any, Tensor | None]]

_EVAL_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.MultiheadAttention,
)
_EVAL_NAMES = ("StochasticDepth", "DropPath")  # torchvision.ops / timm, matched by name (no import needed)


def _train_mode(module: nn.Module) -> bool:
    """Train mode for control flow: a module with submodules (quantizers aside) that is not a numerics layer."""
    if isinstance(module, _EVAL_TYPES) or type(module).__name__ in _EVAL_NAMES:
        return False
    return any(name != QUANTIZER_ATTR for name, _ in module.named_children())


@contextmanager
def training_control_flow(pl_module: nn.Module, seed: int) -> Iterator[None]:
    """Run ``pl_module`` as its ``training_step`` expects without changing it (module docstring); all restored."""
    modes = {m: m.training for m in pl_module.modules()}
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        for m in modes:
            m.training = _train_mode(m)
        object.__setattr__(pl_module, "log", _no_log)
        object.__setattr__(pl_module, "log_dict", _no_log)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for name in ("log", "log_dict"):
            pl_module.__dict__.pop(name, None)
        pl_module.__dict__.update(saved)


def _no_log(*args: Any, **kwargs: Any) -> None:
    """``self.log`` during calibration: Lightning allows no logging in the hooks calibration runs from."""


class Objective:
    """The calibration loss of one callback: chosen once per calibration (:meth:`resolve`), then computed per batch.

    Args:
        choice: ``auto``, ``training_step``, ``cross_entropy`` or ``output`` (module docstring).
        divergence: the output objective's divergence (``auto``, ``kl``, ``mse``).
        ignore_index: target value ``cross_entropy`` ignores.
        seed: seeds the forked generators of ``training_step`` and the output objective's probes.
        split: ``split(batch) -> (inputs, targets)``.

    Attributes:
        used: what :meth:`resolve` chose, for the calibration summary (e.g. ``"training_step (MyModule)"``).

    """

    def __init__(self, choice: str, divergence: Divergence, ignore_index: int, seed: int, split: Split) -> None:
        self.choice = choice
        self.divergence = divergence
        self.ignore_index = ignore_index
        self.seed = seed
        self.split = split
        self.kind = choice  # what resolve() chose: training_step, cross_entropy or output
        self.used = ""
        self._generator: torch.Generator | None = None

    def resolve(self, pl_module: pl.LightningModule, batch: Any) -> str | None:
        """Choose the objective on the first calibration batch; returns a note to warn with, or ``None``.

        Raises:
            ValueError: with ``choice="training_step"``, when it gives no usable loss (the reason is named).

        """
        self._generator = None
        if self.choice in ("cross_entropy", "output"):
            self.kind, self.used = self.choice, _describe(self.choice, self.divergence)
            return None
        loss, reason = self._probe_training_step(pl_module, batch)
        if loss is not None:
            self.kind, self.used = "training_step", f"training_step ({type(pl_module).__name__}.training_step)"
            return None
        if self.choice == "training_step":
            raise ValueError(f"DQACallback(objective='training_step'): {reason}")
        self.kind = "output"
        self.used = f"{_describe('output', self.divergence)}; auto: {reason}"
        return reason if "raised" in reason else None

    def loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The scalar loss of one batch under the resolved objective (its activation gradients are observed)."""
        if self.kind == "training_step":
            loss, reason = self._call_training_step(pl_module, batch)
            if loss is None:
                raise ValueError(f"DQACallback: training_step gave a usable loss on the first batch, but now {reason}")
            return loss
        x, y = self.split(batch)
        if self.kind == "cross_entropy":
            return _cross_entropy(pl_module(x), y, self.ignore_index)
        output = pl_module(x)
        if self._generator is None:
            device = next((t.device for _, t in output_leaves(output)), torch.device("cpu"))
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return fisher_probe(output, self.divergence, self._generator)

    def _probe_training_step(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor | None, str]:
        if not is_overridden("training_step", pl_module, pl.LightningModule):
            return None, f"{type(pl_module).__name__} has no training_step"
        if not pl_module.automatic_optimization:
            return None, "the module optimizes manually (automatic_optimization=False); its training_step is not run"
        try:
            return self._call_training_step(pl_module, batch)
        except Exception as err:  # a user's training_step on calibration data: any failure means "not usable"
            return None, f"training_step raised {type(err).__name__}: {err}"

    def _call_training_step(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor | None, str]:
        with training_control_flow(pl_module, self.seed):
            out = pl_module.training_step(batch, 0)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            return None, f"training_step returned {type(out).__name__}, not a loss tensor or a dict with 'loss'"
        if loss.numel() != 1 or not loss.is_floating_point():
            return None, f"training_step returned a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}"
        if not loss.requires_grad:
            return None, "training_step returned a loss with no autograd graph (computed without gradients)"
        return loss.reshape(()), ""


def _describe(kind: str, divergence: str) -> str:
    if kind == "output":
        return f"output (FP32-vs-quantized divergence, {divergence})"
    return "cross_entropy (logits against the batch's class targets)"


def _cross_entropy(output: Any, y: Tensor | None, ignore_index: int) -> Tensor:
    """Cross-entropy of the output's logits against integer class targets; the rules named when they fail."""
    if y is None:
        raise ValueError(
            "DQACallback(objective='cross_entropy') needs class targets, but the calibration batches have none; "
            "use objective='output' (label-free) or 'training_step'"
        )
    if y.is_floating_point():
        raise ValueError(
            f"DQACallback(objective='cross_entropy') needs integer class targets, got {y.dtype} targets of shape "
            f"{tuple(y.shape)} (cross_entropy would read them as class probabilities); use objective="
            f"'training_step' (the module's own loss) or 'output'"
        )
    return F.cross_entropy(primary_output(output), y, ignore_index=ignore_index)
