"""What the callback reads from a Lightning run: calibration loaders, inputs and targets of a batch, logits.

Users hand data to Lightning in many ways (a datamodule, dataloader methods on the module, loaders passed
straight to ``fit``/``validate``/``test``) and their batches and outputs come in many shapes (tuples, dicts with
``image``/``label`` or ``pixel_values``/``labels``, models returning ``(logits, features)``). The defaults here
cover the common ones and fail with a message that lists what was found and what is accepted.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_dqa.calibration.objectives import DIVERGENCES
from lightning_dqa.core._checks import is_int
from lightning_dqa.deploy.banded import run_banded
from lightning_dqa.deploy.compressed import run_compressed

__all__ = [
    "INPUT_KEYS",
    "LIFECYCLE_FLAGS",
    "OBJECTIVE_CHOICES",
    "OUTPUT_KEYS",
    "TARGET_KEYS",
    "check_lifecycle_args",
    "find_calibration_loader",
    "fp32_accuracy",
    "log_meter_summary",
    "measure_peak_kib",
    "primary_output",
    "split_batch",
]

INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images", "img", "imgs", "pixel_values", "data")
"""Dict-batch keys taken as the model input, in order of preference."""
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels", "mask", "masks", "seg", "segmentation")
"""Dict-batch keys taken as the target, in order of preference."""
OUTPUT_KEYS: tuple[str, ...] = ("logits", "out", "output", "outputs", "pred", "preds")
"""Keys of a dict output taken as the logits, in order of preference."""


OBJECTIVE_CHOICES: tuple[str, ...] = ("auto", "training_step", "cross_entropy", "output")
"""The callback's ``objective`` values (:mod:`lightning_dqa.integration.objective`)."""

LIFECYCLE_FLAGS: tuple[str, ...] = (
    "measure_memory",
    "log_per_layer",
    "fp32_baseline",
    "verbose",
    "check_finite",
    "measure_peak_memory",
)
"""The callback's on/off arguments."""


def check_lifecycle_args(args: Mapping[str, Any]) -> None:
    """Validate the callback's own (non-quantization) arguments; each error names argument, rule and value.

    Args:
        args: the callback's constructor arguments by name.

    Raises:
        ValueError: for the first invalid argument.

    """
    samples, source, delay = args["calibration_samples"], args["calibration_source"], args["delay_steps"]
    objective, ignore_index, export_path = args["greedy_objective"], args["ignore_index"], args["export_path"]
    if not is_int(samples) or samples < 1:
        raise ValueError(f"Expected calibration_samples to be a positive int, got {samples!r}")
    if source not in ("train", "val"):
        raise ValueError(f"Expected calibration_source to be 'train' or 'val', got {source!r}")
    if not is_int(delay) or delay < 0:
        raise ValueError(f"Expected delay_steps to be a non-negative int, got {delay!r}")
    if objective not in ("accuracy", "loss"):
        raise ValueError(f"Expected greedy_objective to be 'accuracy' or 'loss', got {objective!r}")
    if args["objective"] not in OBJECTIVE_CHOICES:
        raise ValueError(f"Expected objective to be one of {list(OBJECTIVE_CHOICES)}, got {args['objective']!r}")
    if args["output_divergence"] not in DIVERGENCES:
        raise ValueError(
            f"Expected output_divergence to be one of {list(DIVERGENCES)}, got {args['output_divergence']!r}"
        )
    if not is_int(ignore_index):
        raise ValueError(f"Expected ignore_index to be an int (a target value to ignore), got {ignore_index!r}")
    for name in LIFECYCLE_FLAGS:
        if not isinstance(args[name], bool):
            raise ValueError(f"Expected {name} to be a bool, got {args[name]!r}")
    if export_path is not None and (not isinstance(export_path, str | os.PathLike) or not str(export_path)):
        raise ValueError(f"Expected export_path to be a non-empty path string or None, got {export_path!r}")


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, targets)`` of a batch: ``(x, y, ...)`` sequences, a bare tensor, or dicts with common keys.

    >>> import torch
    >>> x, y = split_batch({"pixel_values": torch.zeros(2, 3), "labels": torch.ones(2)})
    >>> x.shape, y.tolist()
    (torch.Size([2, 3]), [1.0, 1.0])

    Raises:
        TypeError: for a batch of another type, or a dict with none of :data:`INPUT_KEYS` (the message lists
            the keys found and the keys accepted).

    """
    if isinstance(batch, list | tuple) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        x_key = next((k for k in INPUT_KEYS if k in batch), None)
        if x_key is not None:
            return batch[x_key], next((batch[k] for k in TARGET_KEYS if k in batch), None)
        raise TypeError(
            f"DQACallback found no input in a dict batch with keys {sorted(map(str, batch))}; it takes the input "
            f"from one of {list(INPUT_KEYS)} and the target from one of {list(TARGET_KEYS)}. Rename the keys, or "
            f"override DQACallback.split_batch(batch) -> (inputs, targets)"
        )
    raise TypeError(
        f"DQACallback cannot split a batch of type {type(batch).__name__} into inputs and targets; it takes "
        f"(inputs, targets, ...) sequences, tensors and dicts; override DQACallback.split_batch"
    )


def primary_output(output: Any) -> Tensor:
    """The logits of a model output: a tensor, the first tensor of a tuple/list, or a dict's logits entry.

    Raises:
        TypeError: when no tensor can be found (the message names the type and keys found).

    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, Tensor):
                return item
    if isinstance(output, dict):
        key = next((k for k in OUTPUT_KEYS if isinstance(output.get(k), Tensor)), None)
        if key is not None:
            return output[key]
    keys = f" with keys {sorted(map(str, output))}" if isinstance(output, dict) else ""
    raise TypeError(
        f"DQACallback cannot find the logits in a model output of type {type(output).__name__}{keys}; it takes a "
        f"tensor, the first tensor of a tuple, or one of {list(OUTPUT_KEYS)} of a dict; override "
        f"DQACallback.calibration_loss / calibration_objective"
    )


def _attempts(trainer: pl.Trainer, pl_module: pl.LightningModule, source: str) -> list[tuple[str, Callable[[], Any]]]:
    """Where calibration batches may come from, in order: the holders' methods, then loaders the Trainer has."""
    holders: list[Any] = [h for h in (getattr(trainer, "datamodule", None), pl_module) if h is not None]
    method = "train_dataloader" if source == "train" else "val_dataloader"
    out = [
        (f"{type(h).__name__}.{method}()", getattr(h, method))
        for h in holders
        if callable(getattr(h, method, None)) and is_overridden(method, h)
    ]
    stage = trainer.state.stage.value if trainer.state.stage is not None else ""
    trainer_loaders = {
        "train": ("the training loaders passed to fit", lambda: trainer.train_dataloader),
        "val": ("the validation loaders passed to the Trainer", lambda: trainer.val_dataloaders),
        "test": ("the test loaders passed to test", lambda: trainer.test_dataloaders),
        "predict": ("the loaders passed to predict", lambda: _unshared(trainer.predict_dataloaders)),
    }
    wanted = [source, stage] if stage in ("validate", "test", "train", "predict") else [source]
    for key in dict.fromkeys("val" if k == "validate" else k for k in wanted):
        out.append(trainer_loaders[key])
    return out


def _unshared(loaders: Any) -> Any:
    """The predict loaders, each with its own batch sampler, so calibration does not consume the prediction run.

    Lightning wraps a predict loader's batch sampler in an object that is its own iterator (it records the indices
    of each batch); iterating that loader again from a hook restarts the iterator the prediction loop already
    holds, and the loop would see only what calibration left. A shallow copy reading the wrapped sampler iterates
    apart.
    """
    if isinstance(loaders, list | tuple):
        return type(loaders)(_unshared(loader) for loader in loaders)
    inner = getattr(getattr(loaders, "batch_sampler", None), "_batch_sampler", None)
    if not isinstance(loaders, DataLoader) or inner is None:
        return loaders
    copied = copy.copy(loaders)
    object.__setattr__(copied, "batch_sampler", inner)  # DataLoader forbids setting it once built
    object.__setattr__(copied, "_iterator", None)
    return copied


def _first_non_empty(loader: Any) -> Any:
    """``loader`` itself, the first of a list/tuple/dict of loaders, or ``None`` when it holds nothing."""
    if isinstance(loader, list | tuple):
        loader = next((item for item in loader if item is not None), None)
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


def find_calibration_loader(
    trainer: pl.Trainer, pl_module: pl.LightningModule, source: str, holders_first: Iterable[Any] = ()
) -> Iterable[Any]:
    """The calibration batches of a run: the ``source`` loader, else what the running stage evaluates on.

    Tries, in order: the datamodule's and the module's ``{source}_dataloader()`` (when they define one), the
    loaders the Trainer got for ``source``, then those of the running stage (e.g. the loaders passed to
    ``validate``). Falling back past an attempt that raised warns with its error; when nothing yields a loader
    the error lists every attempt.

    Args:
        trainer: the running Trainer.
        pl_module: the module being evaluated or trained.
        source: ``train`` or ``val``.
        holders_first: loaders found by a more specific lookup (e.g. ``calibration_dataloader``), tried first.

    Returns:
        A loader (an iterable of batches).

    Raises:
        ValueError: when no attempt gave a loader.

    """
    for loader in holders_first:
        if loader is not None:
            return loader
    failures: list[str] = []
    for what, get in _attempts(trainer, pl_module, source):
        try:
            loader = _first_non_empty(get())
        except Exception as err:  # a user's dataloader method: any failure means "not from here"
            failures.append(f"{what} raised {type(err).__name__}: {err}")
            continue
        if loader is None:
            failures.append(f"{what}: none")
            continue
        if failures:
            rank_zero_warn(f"DQACallback calibrates on {what}; tried first: " + "; ".join(failures))
        return loader
    raise ValueError(
        f"DQACallback found no data to calibrate on (calibration_source={source!r}); tried: "
        + "; ".join(failures or ["nothing"])
        + ". Give the datamodule or module a train_dataloader()/val_dataloader(), or pass loaders to the Trainer"
    )


def _class_scores(output: Any) -> Tensor | None:
    """The output's class scores (:func:`primary_output`), or ``None`` for an output without one (detection)."""
    try:
        return primary_output(output)
    except TypeError:
        return None


@torch.no_grad()
def fp32_accuracy(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Iterable[Any],
    split: Callable[[Any], tuple[Any, Tensor | None]],
    ignore_index: int,
) -> float | None:
    """Top-1 accuracy of ``argmax(dim=1)`` over ``loader``, reduced over ranks.

    ``None`` when the batches carry no integer class targets or the model no class scores of their batch size
    (regression, detection): there is no top-1 to measure.

    The module runs as it is (the caller switches its quantizers off) in eval mode; its mode is restored.
    """
    was_training = pl_module.training
    pl_module.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # (correct, total, ranks lacking targets)
    try:
        for batch in loader:
            x, y = split(trainer.strategy.batch_to_device(batch))
            logits = None
            if isinstance(y, Tensor) and not y.is_floating_point():
                logits = _class_scores(pl_module(x))
            if logits is None or y is None or logits.ndim < 2 or logits.shape[0] != y.shape[0]:
                counts[2] = 1.0  # no class targets or scores (regression, detection); every rank reaches the reduce
                break
            valid = y != ignore_index
            counts[0] += ((logits.argmax(dim=1) == y) & valid).sum()
            counts[1] += valid.sum()
    finally:
        pl_module.train(was_training)
    correct, total, lacking = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
    return None if lacking else correct / max(total, 1.0)


@torch.no_grad()
def measure_peak_kib(pl_module: pl.LightningModule, inputs: Any, banded: bool = False) -> dict[str, float]:
    """Measured figures of one image run compressed, by metric name under ``dqa/``; ``{}`` when it cannot run.

    Runs the first sample of ``inputs`` (e.g. ``(N, C, H, W)`` images; only ``inputs[:1]`` is read) through
    :func:`lightning_dqa.deploy.compressed.run_compressed` once, in eval mode, and returns:

    * ``peak_{stored,fp32,int8}_kib_per_image``: the whole network's peak activation KiB, each the size of the
      arena that holds every live buffer at a planned offset (:mod:`lightning_dqa.deploy.arena`), with the
      quantized activations as their blobs, in full precision, and at 8 bits per value;
    * ``live_{stored,fp32,int8}_kib_per_image``: the most KiB live at one step, the arenas' lower bound;
    * ``memory_saving``: ``1 - peak_stored / peak_fp32``, what storing the codes saves of the memory a device
      must hold (negative when the stored pass needs more);
    * ``stored_bits_per_value``: ``8 * sum(blob bytes) / values`` of the blobs that run really wrote
      (:attr:`~lightning_dqa.deploy.compressed.CompressedReport.bits_per_value`);
    * with ``banded``, ``banded_{stored,int8,fp32}_kib_per_image`` of :func:`lightning_dqa.run_banded` (one row per
      band, the model input and output listed apart), and ``memory_saving`` is ``1 - banded_stored /
      peak_fp32``; a model that cannot run banded is warned about and keeps the layer-by-layer figures.

    A model it cannot run (one :mod:`torch.fx` cannot trace, a non-tensor input, or any other failure of the
    compressed pass) gets a warning naming the error and no figures: a figure is never estimated instead.
    """
    if not isinstance(inputs, Tensor):
        rank_zero_warn(
            f"DQACallback: measure_peak_memory needs a tensor input, got {type(inputs).__name__}; no peak "
            "activation memory (dqa/memory_saving) is logged"
        )
        return {}
    was_training = pl_module.training
    pl_module.eval()
    try:
        _, report = run_compressed(pl_module, inputs[:1])
    except Exception as err:  # a side measurement: whatever stops the compressed pass must not stop the run
        rank_zero_warn(
            f"DQACallback: measure_peak_memory could not run the model compressed, so no peak activation memory "
            f"(dqa/memory_saving) is logged: {type(err).__name__}: {err}"
        )
        return {}
    finally:
        pl_module.train(was_training)
    peak, live = report.per_image(), report.per_image(live=True)
    out = {f"peak_{key}_kib_per_image": nbytes / 1024 for key, nbytes in peak.items()}
    out.update({f"live_{key}_kib_per_image": nbytes / 1024 for key, nbytes in live.items()})
    out["memory_saving"] = 1.0 - peak["stored"] / peak["fp32"] if peak["fp32"] else 0.0
    out["stored_bits_per_value"] = report.bits_per_value
    if banded:
        out.update(_banded_kib(pl_module, inputs[:1], peak["fp32"] / 1024))
    return out


def _banded_kib(pl_module: pl.LightningModule, image: Tensor, fp32_kib: float) -> dict[str, float]:
    """``banded_*_kib_per_image`` and the banded ``memory_saving`` of one image, or ``{}`` (warned) on failure."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        _, report = run_banded(pl_module, image)
    except Exception as err:  # a side measurement, as above
        rank_zero_warn(
            f"DQACallback: peak_runtime='banded' could not run the model in bands, so the layer-by-layer peak is "
            f"logged: {type(err).__name__}: {err}"
        )
        return {}
    finally:
        pl_module.train(was_training)
    kib = report.per_image()
    out = {f"banded_{key}_kib_per_image": kib[k] for key, k in (("stored", "stored"), ("int8", "int8_banded"),
                                                                 ("fp32", "fp32_banded"))}  # fmt: skip
    out["memory_saving"] = 1.0 - kib["stored"] / fp32_kib if fp32_kib else 0.0
    return out


def log_meter_summary(pl_module: pl.LightningModule, summary: dict[str, Any], per_layer: bool) -> None:
    """Log the memory meter's summary (:meth:`~.meter.MemoryMeter.compute`) with ``pl_module.log``.

    The meter's saving, ``1 - bits_per_value / 32`` over the quantized tensors each at its own bits, is logged as
    ``dqa/per_tensor_saving``: it is not what a device saves, since a peak also holds full-precision tensors
    (shortcuts, skips, a convolution's output before it is coded). ``dqa/memory_saving`` is the peak's saving,
    from :func:`measure_peak_kib`.
    """
    pl_module.log("dqa/bits_per_value", summary["bits_per_value"])
    pl_module.log("dqa/activation_bytes_per_sample", summary["bytes_per_sample"])
    pl_module.log("dqa/fp32_activation_bytes_per_sample", summary["fp32_bytes_per_sample"])
    pl_module.log("dqa/per_tensor_saving", summary["saving"])
    if per_layer:
        for layer, bpv in summary["per_layer_bits_per_value"].items():
            pl_module.log(f"dqa/layer/{layer}/bits_per_value", bpv)
