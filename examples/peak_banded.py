"""Issue 22's peak table with the banded runtime: what a device holds for one image, and what it costs.

For each network, batch 1, every peak an arena (every live buffer at a planned offset;
:mod:`lightning_dqa.deploy.arena`) with the model input and the final output listed apart (MCUNetV2 does not count
the input):

* ``FP32 layer``: the FP32 pass layer by layer (:func:`lightning_dqa.run_compressed`'s float32 arena);
* ``FP32 banded``: the same row-banded schedule as DQA (:func:`lightning_dqa.run_banded`), every stored value and
  every line buffer in float32, so quantization's share is visible;
* ``int8 banded``: that schedule with every coded value at one byte (TFLite Micro's full-integer plan, banded);
* ``direct 3`` / ``DQA 3``: ``DQAConfig(bits=3, method=..., shared_values="codes")`` through ``run_banded``: every
  stored value (block inputs and shortcuts, U-Net skips) and every line buffer a layer reads quantized as blobs;
* ``DQA 3 int8-res``: ``shared_values="int8"``, the residual stream and skips stored as 8-bit codes.

The scratch of every step (the band rows of every node, decoded rows, line buffers) is counted in all columns, as
float32 tensors. Then accuracy on the test sets (CIFAR-10 top-1, CamVid mIoU) of the fake-quantized model with
``shared_values="fp32"`` (today's 3-bit DQA), ``"codes"`` and ``"int8"``, and how the banded output agrees with the
fake-quantized one (top-1 or per-pixel argmax agreement, the largest absolute difference; bands change no float sum
of a convolution, but a kernel may order a sum by the tensor's shape), and the banded pass against the FP32 forward
at batch 1 (median of ``--repeats``, interleaved).

Networks: the demo ResNet-32 (pretrained from ``../shared``), MobileNetV2 w0.5 and U-Net w16 (the committed
checkpoints), calibrated on CIFAR-10 / CamVid training images; torchvision's ResNet-18, MobileNetV3-Small and
EfficientNet-B0 with random weights at 96x96, calibrated on CIFAR-10 images scaled to 96x96 (no accuracy: their
agreement is measured on ``--agree-images`` scaled test images). Run from the repository root with one thread::

    OMP_NUM_THREADS=1 python examples/peak_banded.py --out docs/results/peak_banded.json

"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any

import torch
from memory_report import SHARED, calibrated
from peak_table import NETWORKS, ends, network_setup, peaks, resized, run_all
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_dqa import DQAConfig, run_banded, run_compressed
from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule
from lightning_dqa.deploy.arena import live_bytes

KIB = 1024.0
COLUMNS = (
    ("fp32_layer", "FP32 layer"), ("fp32_banded", "FP32 banded"), ("int8_banded", "int8 banded"),
    ("direct3", "direct 3"), ("dqa3", "DQA 3"), ("dqa3_int8", "DQA 3 int8-res"),
)  # fmt: skip


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def test_batches(dataset: str, side: int | None, batch: int, limit: int | None) -> Batches:
    """The test set (or its first ``limit`` images) in batches, images scaled to ``side`` when given."""
    root = str(SHARED / "data" / dataset)
    if dataset == "camvid":
        dm: Any = CamVidDataModule(root=root, eval_batch_size=batch, limit_test=limit)
    else:
        dm = CIFAR10DataModule(root=root, eval_batch_size=batch, limit_test=limit)
    dm.setup("test")
    return resized(dm.test_dataloader(), side)


def score(outputs: list[torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]], ignore: int) -> float:
    """Top-1 (%) for logits ``(N, K)``, mIoU (%) for per-pixel logits ``(N, K, H, W)``."""
    if outputs[0].ndim == 2:
        hits = sum(int((o.argmax(1) == y).sum()) for o, (_, y) in zip(outputs, batches, strict=True))
        return 100.0 * hits / sum(len(y) for _, y in batches)
    miou = MulticlassJaccardIndex(outputs[0].shape[1], ignore_index=ignore, average="macro")
    for o, (_, y) in zip(outputs, batches, strict=True):
        miou.update(o.argmax(1), y)
    return 100.0 * float(miou.compute())


def forward_all(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x, _ in batches]


def banded_report(model: nn.Module, x: torch.Tensor, band_rows: int) -> tuple[dict[str, Any], Any]:
    """The banded pass of one image: per-image KiB, where the peak sits, what ran whole, the largest difference."""
    out, report = run_banded(model, x, band_rows=band_rows)
    with torch.no_grad():
        diff = float((out - model(x)).abs().max())
    plan = report.arena("stored")
    figures = {
        **report.per_image(),
        "live": live_bytes(plan.buffers) / KIB,
        "at_peak": [[what, round(n / KIB, 1)] for what, n in report.at_peak()[:5]],
        "whole": [[w.name, w.op, w.why] for w in report.whole],
        "max_abs_diff": diff,
    }
    return figures, report


def agreement(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], reference: list[torch.Tensor],
              band_rows: int) -> tuple[float, float, list[torch.Tensor]]:  # fmt: skip
    """Top-1 (or per-pixel argmax) agreement (%) of the banded outputs with ``reference``, the largest difference."""
    same = total = 0
    worst = 0.0
    outs = []
    for (x, _), ref in zip(batches, reference, strict=True):
        out, _ = run_banded(model, x, band_rows=band_rows)
        outs.append(out)
        same += int((out.argmax(1) == ref.argmax(1)).sum())
        total += ref.argmax(1).numel()
        worst = max(worst, float((out - ref).abs().max()))
    return 100.0 * same / total, worst, outs


def network_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one network."""
    base, batches, x, row = network_setup(name, args.calib)
    _, _, dataset, side, ignore = NETWORKS[name]
    models: dict[str, nn.Module] = {}
    for key, method, mode in (("direct3", "direct", "codes"), ("dqa3", "dqa", "codes"), ("dqa3_int8", "dqa", "int8")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[key] = calibrated(base, DQAConfig(bits=3, method=method, shared_values=mode), batches, ignore)
        row[key], report = banded_report(models[key], x, args.band_rows)
        if key == "dqa3":
            row["fp32_banded"] = report.arena("fp32").nbytes / KIB
            row["int8_banded"] = report.arena("int8").nbytes / KIB
            row["input_kib"], row["output_kib"] = report.input_bytes / KIB, report.output_bytes / KIB
    _, layered = run_compressed(models["dqa3"], x)
    into, outof = ends(layered)
    row["fp32_layer"] = peaks(layered.fp32, into | outof)["apart"]
    row["int8_layer"] = peaks(layered.fp32, into | outof, scale=0.25)["apart"]
    if side is None:  # the demo networks: accuracy on the whole test set
        tests = test_batches(dataset, None, args.eval_batch, args.limit_test)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            today = calibrated(base, DQAConfig(bits=3, method="dqa"), batches, ignore)
        row["score_name"] = "top-1" if dataset == "cifar10" else "mIoU"
        row["images"] = sum(len(y) for _, y in tests)
        row["score_fp32_shared"] = score(forward_all(today, tests), tests, ignore)
        row["score_int8_shared"] = score(forward_all(models["dqa3_int8"], tests), tests, ignore)
        reference = forward_all(models["dqa3"], tests)
        row["score_codes"] = score(reference, tests, ignore)
        agree, worst, outs = agreement(models["dqa3"], tests, reference, args.agree_band_rows)
        row["score_banded"] = score(outs, tests, ignore)
    else:
        tests = test_batches(dataset, side, args.eval_batch, args.agree_images)
        row["images"] = sum(len(y) for _, y in tests)
        reference = forward_all(models["dqa3"], tests)
        agree, worst, _ = agreement(models["dqa3"], tests, reference, args.agree_band_rows)
    row["agreement"], row["agreement_max_abs_diff"] = agree, worst
    fp32_model, dqa = copy.deepcopy(base).eval(), models["dqa3"]
    fp32_ms: list[float] = []
    banded_ms: list[float] = []
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            start = time.perf_counter()
            fp32_model(x)
            fp32_ms.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            run_banded(dqa, x, band_rows=args.band_rows)
            banded_ms.append(1000 * (time.perf_counter() - start))
    row["fp32_ms"], row["banded_ms"] = statistics.median(fp32_ms), statistics.median(banded_ms)
    return row


def _value(r: dict[str, Any], key: str) -> float:
    v = r[key]
    return v["stored"] if isinstance(v, dict) else v


def format_tables(rows: list[dict[str, Any]], band_rows: int) -> str:
    """The tables as aligned text."""
    w = 36
    head = f"{'network':<{w}}{'input':>8}{'output':>8}" + "".join(f"{c:>15}" for _, c in COLUMNS) + f"{'x FP32':>8}"
    lines = [f"Peak activation KiB per image (arena), input and output listed apart (FP32 KiB); band_rows={band_rows}"]
    lines += [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{_value(r, k):>15.1f}" for k, _ in COLUMNS)
        ratio = r["fp32_layer"] / r["dqa3"]["stored"]
        lines.append(f"{r['network']:<{w}}{r['input_kib']:>8.1f}{r['output_kib']:>8.1f}{cells}{ratio:>7.1f}x")
    lines += ["", "All-int8 layer by layer (the issue's baseline, every FP32 buffer at a byte): "
              + ", ".join(f"{r['key']} {r['int8_layer']:.1f}" for r in rows)]  # fmt: skip
    lines += ["", "Where the DQA 3 peak sits (KiB), and what ran whole"]
    for r in rows:
        at = ", ".join(f"{what} {kib}" for what, kib in r["dqa3"]["at_peak"])
        whole = "; ".join(f"{n} ({op}: {why})" for n, op, why in r["dqa3"]["whole"]) or "nothing"
        lines.append(f"{r['key']}: {at}; live {r['dqa3']['live']:.1f}; whole: {whole}")
    head = f"{'network':<{w}}{'score':>7}{'fp32-res':>10}{'codes':>8}{'int8-res':>10}{'banded':>8}{'agree %':>9}"
    head += f"{'max diff':>10}{'1-img diff':>11}"
    lines += ["", "Test set: fake-quantized score with shared_values fp32 (today) / codes / int8; the banded pass"]
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        scores = "".join(
            f"{r[k]:>{n}.2f}" if k in r else f"{'-':>{n}}"
            for k, n in (("score_fp32_shared", 10), ("score_codes", 8), ("score_int8_shared", 10), ("score_banded", 8))
        )
        lines.append(
            f"{r['network']:<{w}}{r.get('score_name', '-'):>7}{scores}{r['agreement']:>9.2f}"
            f"{r['agreement_max_abs_diff']:>10.2g}{r['dqa3']['max_abs_diff']:>11.2g}"
        )
    head = f"{'network':<{w}}{'FP32 forward ms':>16}{'banded ms':>11}{'ratio':>8}"
    lines += ["", "Batch 1, one thread: the banded pass (DQA 3) against the FP32 forward, median", head]
    lines.append("-" * len(head))
    for r in rows:
        ratio = r["banded_ms"] / r["fp32_ms"]
        lines.append(f"{r['network']:<{w}}{r['fp32_ms']:>16.2f}{r['banded_ms']:>11.1f}{ratio:>7.0f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--calib", type=int, default=512, help="calibration images (CamVid: a tenth)")
    parser.add_argument("--band-rows", type=int, default=1, help="output rows per band for the peak")
    parser.add_argument("--agree-band-rows", type=int, default=4, help="rows per band on the test sets")
    parser.add_argument("--eval-batch", type=int, default=100)
    parser.add_argument("--limit-test", type=int, default=None, help="test images of the demo networks (all)")
    parser.add_argument("--agree-images", type=int, default=200, help="scaled test images of torchvision networks")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of each pass (the median is kept)")
    parser.add_argument("--out", default=None, help="write the figures as JSON (docs/results/peak_banded.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    meta = {"calib": args.calib, "band_rows": args.band_rows, "agree_band_rows": args.agree_band_rows}
    return run_all("peak_banded.py", args, argv, lambda name: network_row(name, args),
                   lambda rows: format_tables(rows, args.band_rows), meta)  # fmt: skip

if __name__ == "__main__":
    main()
