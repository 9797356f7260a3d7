"""``MyModule.load_from_checkpoint(path)`` returns the quantized model, with no callback and no code change.

Lightning builds a module from a checkpoint as ``cls(**hyper_parameters)`` and then loads the state dict
strictly, so a checkpoint that carries quantizer buffers would fail on "unexpected keys" (or, with
``strict=False``, silently give the full-precision model). Lightning lets a checkpoint name an *instantiator*
(``hyper_parameters["_instantiator"]``, how LightningCLI rebuilds its modules), accepted only from an allowlist
of trusted functions. When ``DQACallback`` saves a checkpoint it names :func:`instantiate_quantized` there, and
importing :mod:`lightning_dqa` adds that function to Lightning's allowlist. The instantiator builds the module
as Lightning would, and arms its ``on_load_checkpoint`` hook for this one load: the quantizers are installed
from the config the callback saved (checked first, see :mod:`lightning_dqa.deploy.checkpoint`), then Lightning's own
strict ``load_state_dict`` fills them, and they are switched on.

A checkpoint saved by a LightningCLI run keeps its instantiator: :func:`instantiate_quantized_cli` chains to it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from torch import nn

from lightning_dqa.core.attach import prepare, quantizers_of
from lightning_dqa.deploy.checkpoint import check_quantizer_layout, saved_config

__all__ = [
    "INSTANTIATORS",
    "instantiate_quantized",
    "instantiate_quantized_cli",
    "mark_checkpoint",
    "register_instantiators",
]

_SELF = "lightning_dqa.integration.checkpoint_hooks"
_CLI = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
_LEGACY = "lightning_dqa.lightning_checkpoint"  # 0.1's module: checkpoints saved by 0.1 name it
INSTANTIATORS: tuple[str, ...] = (
    f"{_SELF}.instantiate_quantized",
    f"{_SELF}.instantiate_quantized_cli",
    f"{_LEGACY}.instantiate_quantized",
    f"{_LEGACY}.instantiate_quantized_cli",
)
"""The paths a quantized checkpoint may name as its instantiator (the first two are written)."""
_SAVING = "lightning.pytorch.core.saving"


def instantiate_quantized(cls: type, kwargs: dict[str, Any]) -> Any:
    """Build ``cls(**kwargs)`` as Lightning would, armed to install quantizers when the checkpoint loads."""
    return _arm(cls(**kwargs))


def instantiate_quantized_cli(cls: type, kwargs: dict[str, Any]) -> Any:
    """Like :func:`instantiate_quantized`, through LightningCLI's instantiator (a checkpoint of a CLI run)."""
    from lightning.pytorch.cli import instantiate_module

    return _arm(instantiate_module(cls, kwargs))


def _arm(module: Any) -> Any:
    """Install quantizers from the checkpoint in this instance's next ``on_load_checkpoint``, then disarm."""
    hook = module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        del module.on_load_checkpoint  # back to the class's own hook
        install_from_checkpoint(module, checkpoint)
        hook(checkpoint)

    module.on_load_checkpoint = on_load_checkpoint
    return module


def install_from_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Install the quantizers a checkpoint's state dict holds, as its saved config says; enable them once loaded.

    Raises:
        ValueError: when the checkpoint's config or quantizer layout is malformed or does not fit ``module``.

    """
    config = saved_config(checkpoint)
    prepare(module, config)
    check_quantizer_layout(module, checkpoint["state_dict"])

    def enable(mod: nn.Module, incompatible: Any) -> None:
        handle.remove()
        for q in quantizers_of(mod).values():
            q.enabled = bool(q.calibrated)

    handle = module.register_load_state_dict_post_hook(enable)


def mark_checkpoint(checkpoint: MutableMapping[str, Any]) -> None:
    """Name the quantized instantiator in a checkpoint the callback is saving (chaining LightningCLI's)."""
    hparams = checkpoint.setdefault("hyper_parameters", {})
    if not isinstance(hparams, MutableMapping):  # an argparse Namespace or similar: leave it alone
        return
    current = hparams.get("_instantiator")
    if current in INSTANTIATORS[:2]:
        return
    cli = current in _CLI or current == INSTANTIATORS[3]
    hparams["_instantiator"] = INSTANTIATORS[1] if cli else INSTANTIATORS[0]


def _add_to_allowlist(saving: Any) -> None:
    allowed = getattr(saving, "_ALLOWED_INSTANTIATORS", None)
    if isinstance(allowed, set):  # Lightning versions without the allowlist accept any instantiator
        allowed.update(INSTANTIATORS)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after ``name`` is imported (Python has no post-import hook of its own)."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module: Any) -> None:
            exec_module(module)
            then(module)

        spec.loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec


def register_instantiators() -> None:
    """Allow :data:`INSTANTIATORS` in Lightning's checkpoint loading, now or as soon as Lightning is imported.

    Importing :mod:`lightning_dqa` calls this; it never imports Lightning itself.
    """
    saving = sys.modules.get(_SAVING)
    if saving is not None:
        _add_to_allowlist(saving)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_SAVING, _add_to_allowlist))
