"""``DQACallback``: DQA activation quantization inside Lightning's fit / validate / test lifecycle.

The callback is thin orchestration over :mod:`lightning_dqa.calibration.engine`:

* ``setup`` installs quantizers (registered buffers, never a replaced ``forward``) before Lightning restores
  checkpoint weights and wraps the model for DDP, and checks a checkpoint's quantizer layout.
* Calibration runs once, after the model is on its device: at fit start for quantization-aware fine-tuning
  (or once ``delay_steps`` optimizer steps have passed), at validate / test start for post-training
  quantization, never during the sanity check, and never again once the quantizer state is calibrated
  (a resumed run or a calibrated checkpoint keeps its state bit for bit).
* Under DDP each rank reads its share of the calibration samples, statistics are reduced with the
  strategy's ``reduce`` and the final quantizer state is broadcast from rank 0.
* Measured activation memory (a torchmetrics ledger) is logged at the end of every validation / test epoch.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_dqa.calibration.batches import clone_inference
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.calibration.objectives import output_divergence
from lightning_dqa.calibration.report import CalibrationReport
from lightning_dqa.core.attach import prepare, quantizers_of, set_quantizers_enabled
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.deploy.artifact import export_artifact
from lightning_dqa.deploy.checkpoint import CALLBACK_STATE_KEY, check_checkpoint_keys
from lightning_dqa.deploy.meter import MemoryMeter
from lightning_dqa.integration.checkpoint_hooks import mark_checkpoint
from lightning_dqa.integration.data import (
    check_lifecycle_args,
    find_calibration_loader,
    fp32_accuracy,
    log_meter_summary,
    measure_peak_kib,
    primary_output,
    split_batch,
)
from lightning_dqa.integration.distributed import check_strategy, rank_shard, strategy_broadcast, strategy_reducer
from lightning_dqa.integration.finite import FiniteWatch
from lightning_dqa.integration.objective import Objective
from lightning_dqa.integration.progress import CalibrationProgress

__all__ = ["DQACallback"]


@dataclasses.dataclass
class _Chosen:
    """The calibration batches (the first one read to choose the objective, put back) and what was chosen."""

    batches: Iterable[Any]
    used: str


class DQACallback(Callback):
    """Quantize a LightningModule's activations with DQA: ``Trainer(callbacks=[DQACallback(bits=4)])``.

    Quantization settings (see :class:`lightning_dqa.DQAConfig` for each):
        bits, extra_bits, ratio, method, ranking, scale_mode, code, clipping, percentile, where, layer_types,
        include, exclude, first_layer_bits, last_layer_bits, seed, target_bits (a memory budget in bits per
        value: per-layer widths chosen at calibration; logged as ``dqa/target_bits``,
        ``dqa/calibration_bits_per_value`` and ``dqa/layer/<name>/{bits,extra_bits,important}``),
        target_peak_bytes (with ``target_bits``, a limit on the peak activation bytes per sample, measured by
        running the first calibration sample compressed; logged as ``dqa/target_peak_bytes`` and
        ``dqa/calibration_peak_bytes``), shared_values (``codes``: a value a quantized layer and a residual add
        or concatenation both read is quantized once where it is produced and every reader reads those values;
        ``int8``: stored as 8-bit codes, re-quantized by the layer; ``uniform``: the same at ``shared_bits`` bits;
        ``fp32``, the default, keeps it in float32; :mod:`lightning_dqa.core.shared`), shared_bits.

    Lifecycle settings:
        calibration_samples: samples (not batches) read for calibration, split over ranks.
        calibration_source: ``train`` (default; a ``calibration_dataloader(num_samples, seed)`` method of the
            datamodule or module is used when present, e.g. a seeded subset of non-augmented training images)
            or ``val``.
        delay_steps: optimizer steps of full-precision training before fake quantization starts (fit only).
        greedy_objective: what the greedy ranking maximises with class targets: ``accuracy`` (correct
            predictions, the paper) or ``loss`` (negative cross-entropy). Without targets, or with
            ``objective="output"``, it maximises minus the output divergence from full precision.
        objective: the loss whose activation gradients drive gradient rankings (``fisher``, ``saliency``) and the
            memory budget (:mod:`lightning_dqa.integration.objective`): ``auto`` (the module's ``training_step``
            loss when it gives one, else ``output``), ``training_step``, ``cross_entropy`` (against the batch's
            class targets) or ``output`` (label-free: how far quantized outputs move from FP32 outputs). The
            calibration summary says which one ran and why.
        output_divergence: the ``output`` objective's divergence per output leaf: ``auto`` (KL for ``(N, C)``
            logits, MSE for every other output), ``kl`` (over axis 1, e.g. per pixel) or ``mse``.
        ignore_index: target value ignored by the default calibration loss and objective (segmentation void).
        measure_memory: measure bits per stored activation value on validation / test batches.
        log_per_layer: also log each layer's bits per value.
        fp32_baseline: before quantizing (validate / test), evaluate the model once in full precision and log
            ``dqa/fp32_acc`` (correct predictions of ``argmax(dim=1)``, ``ignore_index`` excluded), to sit
            next to the user's own quantized metric.
        export_path: write the deployment artifact (:mod:`lightning_dqa.deploy.artifact`) there after calibration.
        verbose: print the calibration summary table.
        check_finite: at the end of each validation / test epoch, raise if NaN or Inf reached a quantized
            layer (named); one device-side reduction per layer and forward, read once per epoch.
        measure_peak_memory: once per validation / test epoch, before its first batch runs (never in the sanity
            check, never before calibration), run that batch's first image through
            :func:`lightning_dqa.deploy.compressed.run_compressed` (every quantized activation stored as bytes,
            outside the forward pass) and log the whole network's peak activation memory, KiB per image, next to
            FP32 and 8-bit, and ``dqa/memory_saving``, the peak's saving. A model that cannot run compressed
            (e.g. one :mod:`torch.fx` cannot trace) is warned about once and gets no peak figures.
        peak_runtime: ``layer`` measures the peak of the layer-by-layer pass; ``banded`` also runs the image
            through :func:`lightning_dqa.run_banded` (row bands of one row, :mod:`lightning_dqa.deploy.banded`),
            logs ``dqa/banded_{stored,int8,fp32}_kib_per_image`` and makes ``dqa/memory_saving`` the banded
            peak's saving against the FP32 pass layer by layer. Pair it with ``shared_values="codes"``. Python
            runs the bands one by one: under a second per image for ResNet-32 on a CPU, once per evaluation
            epoch. A :class:`~lightning_dqa.DQAConfig` field, so it also says which peak ``target_peak_bytes``
            limits, and it is saved with the checkpoint and the artifact.

    Raises:
        ValueError: at construction, for any invalid argument (the message names it).

    ``validate``, ``test`` and ``predict`` calibrate an uncalibrated module before they run (from the
    calibration sources :meth:`calibration_dataloader` lists, then the stage's own loaders); ``fit`` at its start.

    Override :meth:`split_batch`, :meth:`calibration_loss`, :meth:`calibration_objective` or
    :meth:`calibration_dataloader` for batches or tasks the defaults do not fit.
    """

    def __init__(
        self,
        bits: int = 4,
        extra_bits: int = 3,
        ratio: float = 0.4,
        method: Literal["dqa", "direct", "noisyquant", "fp32"] = "dqa",
        ranking: str = "fisher",
        scale_mode: Literal["dynamic", "static", "learnable"] = "static",
        code: Literal["signed", "unsigned", "auto"] = "auto",
        clipping: Literal["none", "percentile", "mse"] = "mse",
        percentile: float = 99.99,
        where: Literal["input", "output"] = "input",
        layer_types: Sequence[str] = ("Conv2d", "Linear"),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        first_layer_bits: int | None = 8,
        last_layer_bits: int | None = None,
        seed: int = 0,
        target_bits: float | None = None,
        target_peak_bytes: float | None = None,
        shared_values: Literal["fp32", "codes", "int8", "uniform"] = "fp32",
        shared_bits: int = 8,
        calibration_samples: int = 1000,
        calibration_source: Literal["train", "val"] = "train",
        delay_steps: int = 0,
        greedy_objective: Literal["accuracy", "loss"] = "accuracy",
        objective: Literal["auto", "training_step", "cross_entropy", "output"] = "auto",
        output_divergence: Literal["auto", "kl", "mse"] = "auto",
        ignore_index: int = -100,
        measure_memory: bool = True,
        log_per_layer: bool = False,
        fp32_baseline: bool = False,
        export_path: str | None = None,
        verbose: bool = True,
        check_finite: bool = True,
        measure_peak_memory: bool = True,
        peak_runtime: Literal["layer", "banded"] = "layer",
    ) -> None:
        super().__init__()
        args = locals()
        self.config = DQAConfig(**{f.name: args[f.name] for f in dataclasses.fields(DQAConfig)})
        check_lifecycle_args(args)
        self.calibration_samples = calibration_samples
        self.calibration_source = calibration_source
        self.delay_steps = delay_steps
        self.greedy_objective = greedy_objective
        self.objective = objective
        self.output_divergence = output_divergence
        self._objective = Objective(objective, output_divergence, ignore_index, seed, self.split_batch)
        self._references: dict[int, tuple[Any, Any]] = {}
        self._calibrating: pl.LightningModule | None = None
        self.ignore_index = ignore_index
        self.measure_memory = measure_memory
        self.log_per_layer = log_per_layer
        self.fp32_baseline = fp32_baseline
        self.export_path = export_path
        self.verbose = verbose
        self.check_finite = check_finite
        self.measure_peak_memory = measure_peak_memory
        self.peak_runtime = peak_runtime
        self.peak_kib: dict[str, float] = {}
        self._peak_failed = False  # the model could not run compressed (warned once): no more tries
        self._watch: FiniteWatch | None = None
        self.report: CalibrationReport | None = None
        self.fp32_metric: float | None = None
        self._meter: MemoryMeter | None = None
        self._user_strict = True

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        """One DQACallback per Trainer; its checkpoint entry is found by this key."""
        return CALLBACK_STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        """The config is saved so a checkpoint can be restored outside a Trainer (``load_quantized``)."""
        return {"config": self.config.to_dict(), "calibration_samples": self.calibration_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn-free check that the checkpoint was made with the same quantizer settings."""
        saved = state_dict.get("config", {})
        mine = self.config.to_dict()
        for key in ("bits", "extra_bits", "method", "where"):
            if key in saved and saved[key] != mine[key]:
                raise ValueError(
                    f"Checkpoint was calibrated with {key}={saved[key]!r} but DQACallback has {key}={mine[key]!r}"
                )

    # ------------------------------------------------------------------ lifecycle hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install quantizers before checkpoint weights are restored and before the DDP wrap."""
        check_strategy(trainer.strategy)
        if not quantizers_of(pl_module):
            prepare(pl_module, self.config)
        for old in (self._meter, self._watch):  # a Trainer re-runs setup for each stage: one set of hooks
            if old is not None:
                old.remove()
        self._meter = MemoryMeter(pl_module) if self.measure_memory else None
        self._watch = FiniteWatch(pl_module) if self.check_finite else None
        # Lightning loads checkpoint weights after this hook; the checkpoint may be full precision (no
        # quantizer entries). Loading is made lenient here and checked strictly in on_load_checkpoint.
        self._user_strict = pl_module.strict_loading
        pl_module.strict_loading = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Name the quantized instantiator, so ``MyModule.load_from_checkpoint(path)`` needs no callback."""
        mark_checkpoint(checkpoint)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Check the checkpoint's quantizer layout (and, unless the user relaxed it, every other key)."""
        has_quantizers = check_checkpoint_keys(pl_module, checkpoint["state_dict"], strict=self._user_strict)
        if not has_quantizers:
            rank_zero_info("DQACallback: the checkpoint is full precision; its quantizers will be calibrated")
        pl_module.strict_loading = self._user_strict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate for quantization-aware fine-tuning (unless resumed or delayed).

        This is the first hook after the Trainer loaded the training data, so loaders passed straight to
        ``fit`` can serve calibration; the sanity check before it runs in full precision.
        """
        if self.delay_steps == 0:
            self._ensure_calibrated(trainer, pl_module)
        self._sync_enabled(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start fake quantization once ``delay_steps`` optimizer steps have passed."""
        if trainer.global_step >= self.delay_steps:
            self._ensure_calibrated(trainer, pl_module)
        self._sync_enabled(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Post-training quantization for ``validate``; nothing during fit's sanity check."""
        if trainer.sanity_checking or trainer.state.fn == "fit":
            self._sync_enabled(trainer, pl_module)
        else:
            self._start_evaluation(trainer, pl_module, "val")
        self._reset_meter()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Predict with the quantized model, calibrating it first (as ``validate`` and ``test`` do) when needed.

        Calibration reads :meth:`calibration_dataloader`'s sources, then the loaders passed to ``predict``
        (unlabeled data calibrates with the ``output`` objective).

        Raises:
            RuntimeError: when the module is uncalibrated and no calibration data can be found (the message lists
                where it looked and what to pass), rather than predicting in full precision.

        """
        if not self._calibrated(pl_module):
            try:
                self._ensure_calibrated(trainer, pl_module)
            except ValueError as err:
                if "found no data to calibrate on" not in str(err):
                    raise
                raise RuntimeError(
                    f"DQACallback: trainer.predict would run in full precision, since the module is not calibrated "
                    f"and {err}. Pass calibration data (e.g. a train_dataloader() on the module or datamodule), or "
                    f"ckpt_path= of a calibrated checkpoint"
                ) from err
        set_quantizers_enabled(pl_module, True)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Post-training quantization for ``test``."""
        self._start_evaluation(trainer, pl_module, "test")
        self._reset_meter()

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """With ``measure_peak_memory``, measure the peak activation memory (:meth:`_measure_peak`)."""
        self._measure_peak(trainer, pl_module, batch, batch_idx == 0 and dataloader_idx == 0)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """With ``measure_peak_memory``, measure the peak activation memory (:meth:`_measure_peak`)."""
        self._measure_peak(trainer, pl_module, batch, batch_idx == 0 and dataloader_idx == 0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log measured activation memory."""
        self._log_memory(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log measured activation memory."""
        self._log_memory(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stop measuring (the quantizers stay installed and calibrated on the module)."""
        for watcher in (self._meter, self._watch):
            if watcher is not None:
                watcher.active = False
        if stage in ("validate", "test") and not trainer.interrupted and not self._calibrated(pl_module):
            what = getattr(stage, "value", stage)
            rank_zero_warn(f"DQACallback: {what} ran no batches, so nothing was calibrated, quantized or measured")

    # ------------------------------------------------------------------ extension points
    def split_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """``(inputs, targets)`` of a batch; see :func:`lightning_dqa.integration.data.split_batch` for the rules."""
        return split_batch(batch)

    def calibration_loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """Loss whose activation gradients drive the ``fisher`` / ``saliency`` rankings and the budget.

        The default computes the ``objective`` chosen for this calibration (see the class docstring); override it
        for a loss of your own (the summary then names your override).
        """
        return self._objective.loss(pl_module, batch)

    def calibration_objective(self, output: Any, batch: Any) -> Tensor:
        """Summed score of one batch for the greedy search (higher is better).

        With class targets (and ``objective`` not ``output``): correct predictions, or minus the summed
        cross-entropy (``greedy_objective``). Otherwise minus the output divergence from the FP32 model's output
        on the same batch (:func:`~lightning_dqa.calibration.objectives.output_divergence`).
        """
        _, y = self.split_batch(batch)
        if y is None or self.objective == "output":
            return -output_divergence(self._reference(batch), output, self.output_divergence)
        output = primary_output(output)
        if self.greedy_objective == "loss":
            return -F.cross_entropy(output, y, ignore_index=self.ignore_index, reduction="sum")
        valid = y != self.ignore_index
        return ((output.argmax(dim=1) == y) & valid).sum()

    def calibration_dataloader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        """Where calibration samples come from (see ``calibration_source``).

        With ``calibration_source="train"`` a ``calibration_dataloader(num_samples, seed)`` method of the datamodule
        or module wins (e.g. a seeded subset of training images with evaluation transforms); then
        :func:`lightning_dqa.integration.data.find_calibration_loader` looks in the usual places.
        """
        special = []
        if self.calibration_source == "train":
            for holder in (getattr(trainer, "datamodule", None), pl_module):
                fn = getattr(holder, "calibration_dataloader", None)
                if holder is not None and callable(fn):
                    takes = len(inspect.signature(fn).parameters)  # (num_samples, seed), fewer, or none
                    special.append(fn(*(self.calibration_samples, self.config.seed)[:takes]))
                    break
        return find_calibration_loader(trainer, pl_module, self.calibration_source, special)

    # ------------------------------------------------------------------ internals
    def _choose_objective(self, pl_module: pl.LightningModule, batches: Iterable[Any]) -> _Chosen:
        """Resolve ``objective`` on the first calibration batch (when a loss is needed); the batches, intact."""
        needs_loss = self.config.needs_gradients
        greedy = self.config.selects_channels and self.config.ranking == "greedy"
        if not needs_loss and not greedy:
            return _Chosen(batches, "")
        if needs_loss and type(self).calibration_loss is not DQACallback.calibration_loss:
            return _Chosen(batches, f"{type(self).__name__}.calibration_loss (overridden)")
        it = iter(batches)
        first = next(it, None)
        if first is None:
            return _Chosen(it, "")
        batches = itertools.chain([first], it)
        if not needs_loss:  # greedy only: say what its score reads (calibration_objective)
            if type(self).calibration_objective is not DQACallback.calibration_objective:
                return _Chosen(batches, f"{type(self).__name__}.calibration_objective (overridden)")
            if self.split_batch(first)[1] is None or self.objective == "output":
                return _Chosen(batches, "greedy score: minus the output divergence from FP32")
            return _Chosen(batches, f"greedy score: {self.greedy_objective} against the targets")
        set_quantizers_enabled(pl_module, False)
        was_training = pl_module.training
        try:
            with torch.inference_mode(False), torch.enable_grad():
                note = self._objective.resolve(pl_module, clone_inference(first))
        finally:
            pl_module.train(was_training)
        if note is not None:
            rank_zero_warn(f"DQACallback calibrates with the output objective: {note}")
        return _Chosen(batches, self._objective.used)

    def _reference(self, batch: Any) -> Any:
        """The FP32 model's output for a calibration batch (computed once per batch with the quantizers off)."""
        if self._calibrating is None:
            raise RuntimeError("DQACallback: the output objective reads FP32 outputs only during calibration")
        key = id(batch)
        if key not in self._references:
            module = self._calibrating
            states = {q: q.enabled for q in quantizers_of(module).values()}
            set_quantizers_enabled(module, False)
            try:
                with torch.no_grad():
                    self._references[key] = (batch, module(self.split_batch(batch)[0]))
            finally:
                for q, enabled in states.items():
                    q.enabled = enabled
        return self._references[key][1]

    def _calibrated(self, pl_module: pl.LightningModule) -> bool:
        qs = quantizers_of(pl_module).values()
        return bool(qs) and all(bool(q.calibrated) for q in qs)

    def _sync_enabled(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        active = self._calibrated(pl_module) and trainer.global_step >= self.delay_steps
        set_quantizers_enabled(pl_module, active)

    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._calibrated(pl_module):
            if self.fp32_baseline:
                self._evaluate_fp32(trainer, pl_module, stage)
            self._ensure_calibrated(trainer, pl_module)
        set_quantizers_enabled(pl_module, True)

    def _ensure_calibrated(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._calibrated(pl_module):
            return
        loader = self.calibration_dataloader(trainer, pl_module)
        world, rank, strategy = trainer.world_size, trainer.global_rank, trainer.strategy
        per_rank = math.ceil(self.calibration_samples / world)
        bars = [CalibrationProgress(trainer, per_rank, "DQA calibration")]

        def rank_progress(done: int, total: int) -> None:
            if len(bars) == 1:
                bars.append(CalibrationProgress(trainer, total, "DQA channel ranking", unit="channel"))
            bars[-1].set_total(done, total)

        first: list[Any] = []  # the first calibration input: target_peak_bytes runs its first sample compressed

        def remember(batch: Any) -> None:
            if not first:
                x = self.split_batch(batch)[0]
                first.append(x[:1].detach() if isinstance(x, Tensor) else x)

        def forward_fn(model: nn.Module, batch: Any) -> Any:  # the statistics pass ignores the output
            remember(batch)
            return model(self.split_batch(batch)[0])

        def loss_fn(model: nn.Module, batch: Any) -> Tensor:
            remember(batch)
            return self.calibration_loss(pl_module, batch)

        batches = rank_shard(loader, strategy, world, rank)
        objective = self._choose_objective(pl_module, batches)
        self._calibrating, self._references = pl_module, {}
        try:
            self.report = calibrate(
                pl_module,
                self.config,
                objective.batches,
                forward_fn=forward_fn,
                loss_fn=loss_fn,
                objective_fn=self.calibration_objective,
                num_samples=per_rank,
                reducer=strategy_reducer(strategy, world),
                broadcast=strategy_broadcast(strategy, world),
                progress=bars[0].update,
                rank_progress=rank_progress,
                example_input=lambda: first[0] if first else None,
            )
        finally:
            for bar in bars:
                bar.close()
            self._calibrating, self._references = None, {}
        self.report.objective = objective.used
        samples = self.report.samples
        if world > 1:  # shards may be uneven: count what every rank read
            read = torch.tensor(float(samples), device=strategy.root_device)
            samples = int(strategy.reduce(read, reduce_op="sum"))
        self._after_calibration(trainer, pl_module, samples)

    def _after_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule, samples: int) -> None:
        """Log the sample count, print the summary, build the meter's code books, write the artifact."""
        assert self.report is not None
        if samples < self.calibration_samples:
            rank_zero_warn(
                f"DQACallback calibrated on {samples} samples, fewer than calibration_samples="
                f"{self.calibration_samples}: the calibration data holds no more"
            )
        metrics = {"dqa/calibration_samples": float(samples)}
        if self.report.allocation is not None:  # the budget, what calibration achieved, each layer's choice
            metrics.update(self.report.allocation.metrics())
        for logger in trainer.loggers:  # self.log is not allowed in on_fit_start / on_*_start hooks
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(self.report.summary(self.config, samples))
        if self._meter is not None:
            self._meter.build_codebooks(self.report)
        if self.export_path and trainer.is_global_zero:
            export_artifact(pl_module, self.export_path, self.config)

    def _evaluate_fp32(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        if loader is not None:
            set_quantizers_enabled(pl_module, False)
            self.fp32_metric = fp32_accuracy(trainer, pl_module, loader, self.split_batch, self.ignore_index)
            if self.fp32_metric is None:
                rank_zero_warn(
                    "DQACallback(fp32_baseline=True) logs top-1 of argmax(dim=1) against integer class targets; this "
                    "run's batches or outputs have none (regression, detection, unlabeled data), so dqa/fp32_acc is "
                    "not logged"
                )

    def _reset_meter(self) -> None:
        for watcher in (self._meter, self._watch):
            if watcher is not None:
                watcher.reset()
                watcher.active = True

    def _measure_peak(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, first: bool) -> None:
        """One compressed run of the first image of an evaluation epoch, before its forward pass.

        Skipped in the sanity check, before calibration, and after a failure (warned once, no figures).
        """
        if not first or not self.measure_peak_memory or self._peak_failed or trainer.sanity_checking:
            return
        if self._calibrated(pl_module):
            self.peak_kib = measure_peak_kib(
                pl_module, self.split_batch(batch)[0], banded=self.peak_runtime == "banded"
            )
            self._peak_failed = not self.peak_kib

    def _log_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        bad = self._watch.bad_layers() if self._watch is not None and self._calibrated(pl_module) else []
        if bad:
            raise ValueError(
                f"DQACallback: NaN or Inf activations reached the quantized layers {bad} during evaluation; check "
                f"the inputs and the model (or pass check_finite=False to skip this check)"
            )
        if self.fp32_metric is not None:
            pl_module.log("dqa/fp32_acc", self.fp32_metric, sync_dist=False)
        for key, value in self.peak_kib.items():  # one image: peak KiB, memory_saving, blob bits per value
            pl_module.log(f"dqa/{key}", value, sync_dist=False)
        if self._meter is None or not self._calibrated(pl_module) or not self._meter.has_data():
            return
        log_meter_summary(pl_module, self._meter.compute(), self.log_per_layer)
        self._meter.active = False
