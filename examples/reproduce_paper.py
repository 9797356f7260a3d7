"""Reproduce the DQA paper's CIFAR-10 numbers with the Lightning callback: one record per run, as JSON.

Every run builds a fresh model, puts ``DQACallback`` in a quiet ``Trainer`` and calls ``validate`` on the
CIFAR-10 test set, exactly what a user does. Records hold the keys
``arch, method, bits, extra_bits, ratio, ranking, setting, accuracy, bits_per_value, calib_seconds,
eval_seconds`` and a few more: the whole network's peak activation KiB of one image in FP32 and stored
(``peak_fp32_kib``, ``peak_stored_kib``, arena sizes from ``run_compressed``) and ``peak_saving`` (the logged
``dqa/memory_saving``), the quantized tensors' KiB per image and ``per_tensor_saving`` (their sum at the stored
bits against FP32, not a device's saving), test images, seed.

Settings:
    ``paper``: the paper's quantizer: dynamic per-channel maxima, signed codes, no clipping, every
        Conv2d/Linear *output* at ``n`` bits, first and last layer included.
    ``default``: this project's default: layer *inputs* (what a deployment stores), static scales with
        MSE clipping, unsigned codes for non-negative tensors, the image (first layer input) at 8 bits.

Example (the paper's 3-bit row, quick)::

    python examples/reproduce_paper.py --bits 3 --methods fp32 direct dqa --limit-test 1000 --out r.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything

from lightning_dqa import DQACallback
from lightning_dqa.core.config import PAPER_QUANTIZER
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.tasks import ImageClassifier, SegmentationModel

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_WEIGHTS = SHARED / "weights" / "resnet32-d509ac18.th"
DEFAULT_DATA = SHARED / "data" / "cifar10"

SETTINGS: dict[str, dict[str, Any]] = {
    "paper": dict(PAPER_QUANTIZER),
    "default": dict(scale_mode="static", code="auto", clipping="mse", where="input", first_layer_bits=8),
}


def run_one(
    *,
    arch: str,
    weights: str,
    datamodule: LightningDataModule,
    method: str,
    bits: int,
    setting: str = "default",
    ranking: str = "fisher",
    ratio: float = 0.4,
    extra_bits: int = 3,
    calib_samples: int = 5000,
    seed: int = 0,
    experiment: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    stage: str = "validate",
    **overrides: Any,
) -> dict[str, Any]:
    """Post-training quantization of one model with one configuration; returns its record.

    ``model_kwargs`` go to the task's constructor (e.g. ``{"arch_kwargs": {"width_mult": 0.5}}``); ``arch="unet"``
    builds a :class:`SegmentationModel` and records its mIoU as well. ``stage`` is ``validate`` (the CIFAR-10
    data module validates on the test set) or ``test``.
    """
    seed_everything(seed, verbose=False)
    model = build_task(arch, weights, model_kwargs)
    kwargs: dict[str, Any] = dict(SETTINGS[setting])
    kwargs.update(overrides)
    callback = DQACallback(
        bits=bits,
        extra_bits=extra_bits,
        ratio=ratio,
        method=method,
        ranking=ranking,
        seed=seed,
        calibration_samples=calib_samples,
        verbose=False,
        **kwargs,
    )
    trainer = _quiet_trainer(callback, devices=1, enable_checkpointing=False)
    start = time.perf_counter()
    metrics = _evaluate(trainer, model, datamodule, stage)
    total = time.perf_counter() - start
    report = callback.report
    calib = 0.0 if report is None else report.stats_seconds + report.rank_seconds
    return {
        "arch": arch,
        "method": method,
        "bits": None if method == "fp32" else bits,
        "extra_bits": extra_bits if method == "dqa" else None,
        "ratio": ratio if method == "dqa" else 0.0,
        "ranking": ranking if method == "dqa" else None,
        "setting": setting,
        **_scores(metrics),
        "bits_per_value": round(float(metrics["dqa/bits_per_value"]), 4),
        "activation_kib_per_image": round(float(metrics["dqa/activation_bytes_per_sample"]) / 1024, 2),
        "fp32_activation_kib_per_image": round(float(metrics["dqa/fp32_activation_bytes_per_sample"]) / 1024, 2),
        "per_tensor_saving": round(float(metrics["dqa/per_tensor_saving"]), 4),
        **_peak(metrics),
        "calib_samples": calib_samples,
        "calib_seconds": round(calib, 2),
        "eval_seconds": round(total - calib, 2),
        "test_images": _evaluated_images(datamodule, stage),
        "seed": seed,
        **({"experiment": experiment} if experiment else {}),
        **{k: v for k, v in overrides.items() if k not in SETTINGS[setting]},
    }


def fine_tune_one(
    *,
    arch: str,
    weights: str,
    datamodule: LightningDataModule,
    bits: int = 3,
    steps: int = 200,
    lr: float = 0.002,
    calib_samples: int = 5000,
    model_kwargs: dict[str, Any] | None = None,
    stage: str = "validate",
    seed: int = 0,
    freeze_bn_stats: bool = False,
    **callback_kwargs: Any,
) -> dict[str, Any]:
    """DQA in the default setting with learnable scales, fine-tuned for ``steps`` optimizer steps, then evaluated.

    The task's own optimizer and schedule run (cosine over the ``steps``) at learning rate ``lr`` without weight
    decay; calibration happens at fit start, as for any user of the callback. ``freeze_bn_stats`` keeps
    BatchNorm's running statistics as calibration saw them (the task's option of that name). Returns the record of
    the run.
    """
    seed_everything(seed, verbose=False)
    task_kwargs = {**(model_kwargs or {}), "lr": lr, "weight_decay": 0.0}
    if freeze_bn_stats:
        task_kwargs["freeze_bn_stats"] = True
    model = build_task(arch, weights, task_kwargs)
    callback = DQACallback(
        bits=bits,
        scale_mode="learnable",
        calibration_samples=calib_samples,
        seed=seed,
        verbose=False,
        **callback_kwargs,
    )
    trainer = _quiet_trainer(
        callback, max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    # A second Trainer evaluates (the first one has validation off); the callback keeps the fine-tuned state,
    # since it never calibrates a calibrated model again.
    metrics = _evaluate(_quiet_trainer(callback), model, datamodule, stage)
    config = callback.config
    return {
        "arch": arch,
        "method": "dqa",
        "bits": bits,
        "extra_bits": config.extra_bits,
        "ratio": config.ratio,
        "ranking": config.ranking,
        "setting": "default+qat",
        **_scores(metrics),
        "bits_per_value": round(float(metrics["dqa/bits_per_value"]), 4),
        "per_tensor_saving": round(float(metrics["dqa/per_tensor_saving"]), 4),
        **_peak(metrics),
        "qat_steps": steps,
        "qat_batch_size": getattr(datamodule, "batch_size", None),
        "qat_lr": lr,
        "qat_freeze_bn_stats": freeze_bn_stats,
        "train_seconds": round(train_seconds, 1),
        "calib_samples": calib_samples,
        "seed": seed,
    }


def _quiet_trainer(callback: DQACallback, **kwargs: Any) -> Trainer:
    """A CPU Trainer with ``callback`` and no logger, progress bar or model summary."""
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )


def _evaluate(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule, stage: str) -> dict:
    """The metrics of ``trainer.validate`` or ``trainer.test``, their ``val/`` or ``test/`` prefix read ``eval/``."""
    if stage not in ("validate", "test"):
        raise ValueError(f"Expected stage to be 'validate' or 'test', got {stage!r}")
    run = trainer.validate if stage == "validate" else trainer.test
    (metrics,) = run(model, datamodule=datamodule, verbose=False)
    prefix = "val/" if stage == "validate" else "test/"
    return {("eval/" + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in metrics.items()}


def _peak(metrics: dict) -> dict[str, float | None]:
    """The peak of one image run compressed, as the callback logged it (``None`` where it could not run)."""
    names = {"peak_fp32_kib": "dqa/peak_fp32_kib_per_image", "peak_stored_kib": "dqa/peak_stored_kib_per_image"}
    out: dict[str, float | None] = {k: _maybe(metrics, m, 2) for k, m in names.items()}
    out["peak_saving"] = _maybe(metrics, "dqa/memory_saving", 4)
    return out


def _maybe(metrics: dict, name: str, digits: int) -> float | None:
    return round(float(metrics[name]), digits) if name in metrics else None


def _scores(metrics: dict) -> dict[str, float]:
    """Accuracy, and mIoU when the task reports it, in percent with two decimals."""
    out = {"accuracy": round(100.0 * float(metrics["eval/acc"]), 2)}
    if "eval/miou" in metrics:
        out["miou"] = round(100.0 * float(metrics["eval/miou"]), 2)
    return out


def build_task(arch: str, weights: str, model_kwargs: dict[str, Any] | None = None) -> LightningModule:
    """The LightningModule of ``arch`` with ``weights`` loaded: a :class:`SegmentationModel` for ``unet``."""
    if arch == "unet":
        return SegmentationModel(arch=arch, weights=weights, **(model_kwargs or {}))
    return ImageClassifier(arch=arch, weights=weights, **(model_kwargs or {}))


def _evaluated_images(datamodule: LightningDataModule, stage: str) -> int:
    """How many images the validate / test loader of ``datamodule`` holds."""
    loader = datamodule.val_dataloader() if stage == "validate" else datamodule.test_dataloader()
    return len(loader.dataset)


def make_datamodule(data_root: str, limit_test: int | None, calib_samples: int, seed: int) -> CIFAR10DataModule:
    """The CIFAR-10 data module used by every run (evaluation on the test set)."""
    return CIFAR10DataModule(
        root=data_root,
        eval_batch_size=500,
        limit_test=limit_test,
        seed=seed,
    )


def quiet() -> None:
    """Silence Lightning's per-run banners (the script prints its own table)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is an invalid version.*")


def format_table(records: list[dict[str, Any]]) -> str:
    """Aligned text table of records: accuracy, measured bits per value and the whole network's peak.

    ``FP32 KiB`` and ``peak KiB`` are one image's peak activation memory (the arena ``run_compressed`` plans)
    in full precision and with the quantized activations stored as their bytes; ``saving`` is
    ``1 - peak / FP32``.
    """
    head = (
        f"{'setting':<8} {'method':<11}{'bits':>5}{'rank':>9}{'acc %':>8}{'bits/val':>9}"
        f"{'FP32 KiB':>10}{'peak KiB':>10}{'saving':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        bits = "32" if r["bits"] is None else str(r["bits"])
        fp32, peak, saving = r.get("peak_fp32_kib"), r.get("peak_stored_kib"), r.get("peak_saving")
        lines.append(
            f"{r['setting']:<8} {r['method']:<11}{bits:>5}{(r['ranking'] or '-'):>9}{r['accuracy']:>8.2f}"
            f"{r['bits_per_value']:>9.3f}{_num(fp32, 10, '.1f')}{_num(peak, 10, '.1f')}"
            + (f"{100 * saving:>7.1f}%" if saving is not None else f"{'-':>8}")
        )
    return "\n".join(lines)


def _num(value: float | None, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="local path or URL of the weights")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--bits", type=int, nargs="+", default=[3])
    parser.add_argument("--methods", nargs="+", default=["fp32", "direct", "noisyquant", "dqa"])
    parser.add_argument("--settings", nargs="+", default=["default"], choices=sorted(SETTINGS))
    parser.add_argument("--ranking", default="fisher")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--extra-bits", type=int, default=3)
    parser.add_argument("--limit-test", type=int, default=None, help="first N test images (default: all 10,000)")
    parser.add_argument("--calib-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=None,
        help='JSON for the task constructor, e.g. \'{"arch_kwargs": {"width_mult": 0.5, "dropout": 0.0}}\' for '
        "examples/checkpoints/mobilenetv2_w050_cifar10.pt",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for path, what in ((args.data_root, "--data-root"), (args.weights, "--weights")):
        if not str(path).startswith(("http://", "https://")) and not Path(path).exists():
            parser.error(f"{what} {path} does not exist (expected ../shared beside the repository, or pass a path)")
    quiet()
    dm = make_datamodule(args.data_root, args.limit_test, args.calib_samples, args.seed)
    records = []
    for setting in args.settings:
        for method in args.methods:
            for bits in [args.bits[0]] if method == "fp32" else args.bits:
                if method == "fp32" and setting != args.settings[0]:
                    continue
                rec = run_one(
                    arch=args.arch,
                    weights=args.weights,
                    datamodule=dm,
                    method=method,
                    bits=bits,
                    setting=setting,
                    ranking=args.ranking,
                    ratio=args.ratio,
                    extra_bits=args.extra_bits,
                    calib_samples=args.calib_samples,
                    seed=args.seed,
                    model_kwargs=args.model_kwargs,
                )
                records.append(rec)
                print(format_table([rec]).splitlines()[-1], flush=True)
    print()
    print(format_table(records))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
