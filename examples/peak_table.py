"""Issue 22's peak table, as far as the compressed runtime goes today: what a device must hold for one image.

For each network, batch 1, every figure an arena (every live buffer at a planned offset, greedy by size as TFLite
Micro plans it; :mod:`lightning_dqa.deploy.arena`) from :func:`lightning_dqa.run_compressed`:

* ``FP32``: the pass layer by layer in float32;
* ``all-int8``: TFLite Micro's full-integer plan on the same schedule: every buffer of the FP32 pass (input,
  shortcuts, skips, outputs included) at one byte per value, planned again;
* ``direct 3`` / ``DQA 3``: the default setting ``DQAConfig(bits=3, method=...)``, each quantized activation
  stored as its blob, the rest in float32 (as ``run_compressed`` runs it: no banded execution, no coded
  shortcuts);

once with every buffer and once with the model input and the final output listed apart (their buffers left
out of the arena; MCUNetV2 does not count the input). Also the most KiB live at one step for DQA 3 (the arena's
lower bound), where its peak sits, and the compressed pass against the FP32 forward and the fake-quantized
forward at batch 1 and 8, timed interleaved in one run (median of ``--repeats``): ``run_compressed`` (traced at
every call) and a ``CompressedRunner`` made beforehand. Each compressed output is checked bit for bit against the
fake-quantized forward.

Networks: the demo ResNet-32 (pretrained weights from ``../shared`` when present), MobileNetV2 w0.5 and U-Net
w16 (the committed checkpoints), calibrated on CIFAR-10 / CamVid training images; torchvision's ResNet-18,
MobileNetV3-Small and EfficientNet-B0 with random weights at 96x96, calibrated on CIFAR-10 images scaled to
96x96 (their accuracy is not the point). Run from the repository root with one thread::

    OMP_NUM_THREADS=1 python examples/peak_table.py --out docs/results/peak_table.json

"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
import torchvision
from memory_report import SHARED, calibrated, data, mobilenetv2, unet
from torch import nn

from lightning_dqa import DQAConfig
from lightning_dqa.demos.data import CamVidDataModule
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.deploy.arena import Buffer, plan_arena
from lightning_dqa.deploy.compressed import CompressedReport, CompressedRunner, run_compressed
from lightning_dqa.deploy.liveness import Peak

KIB = 1024.0
WEIGHTS = SHARED / "weights" / "resnet32-d509ac18.th"


def resnet32() -> nn.Module:
    """The demo ResNet-32, pretrained when ``../shared`` has its weights."""
    model = build_model("resnet32")
    return load_pretrained(model, WEIGHTS) if WEIGHTS.exists() else model


def tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None)

    return build


# name: (title, build, dataset, image side or None for the dataset's own, ignore index of the loss)
NETWORKS: dict[str, tuple[str, Callable[[], nn.Module], str, int | None, int]] = {
    "resnet32": ("ResNet-32, CIFAR-10 3x32x32", resnet32, "cifar10", None, -100),
    "mobilenetv2": ("MobileNetV2 w0.5, CIFAR-10 3x32x32", mobilenetv2, "cifar10", None, -100),
    "unet": ("U-Net w16, CamVid 3x180x240", unet, "camvid", None, CamVidDataModule.ignore_index),
    "resnet18": ("torchvision ResNet-18 3x96x96", tv("resnet18"), "cifar10", 96, -100),
    "mobilenet_v3_small": ("torchvision MobileNetV3-S 3x96x96", tv("mobilenet_v3_small"), "cifar10", 96, -100),
    "efficientnet_b0": ("torchvision EfficientNet-B0 3x96x96", tv("efficientnet_b0"), "cifar10", 96, -100),
}  # fmt: skip


def resized(batches: Any, side: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration batches, images scaled to ``side x side`` when given."""
    if side is None:
        return [(x, y) for x, y in batches]
    return [(TF.interpolate(x, size=(side, side), mode="bilinear", align_corners=False), y) for x, y in batches]


def ends(report: CompressedReport) -> tuple[set[str], set[str]]:
    """Names of the arena buffers that hold the model input and the final output.

    The input's buffers are the ones allocated at a placeholder step (inputs are never written in place or
    coded); the output's are the ones live at the last step (the ``output`` step reads only the outputs).
    """
    first = {i for i, s in enumerate(report.steps) if s.is_input}
    last = len(report.steps) - 1
    buffers = report.fp32.arena.buffers
    return {b.name for b in buffers if b.first in first}, {b.name for b in buffers if b.last == last}


def arena_kib(buffers: list[Buffer], leave_out: set[str], scale: float = 1.0) -> float:
    """KiB of the arena of ``buffers`` (sizes times ``scale``), those named in ``leave_out`` left out."""
    kept = [Buffer(int(b.nbytes * scale), b.first, b.last, b.name) for b in buffers if b.name not in leave_out]
    return plan_arena(kept).nbytes / KIB


def peaks(peak: Peak, apart: set[str], scale: float = 1.0) -> dict[str, float]:
    """``{"all", "apart"}``: the arena with every buffer, and without the input's and the output's."""
    buffers = peak.arena.buffers
    return {"all": arena_kib(buffers, set(), scale), "apart": arena_kib(buffers, apart, scale)}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - start))
    return out


def network_setup(name: str, calib: int) -> tuple[nn.Module, list[Any], torch.Tensor, dict[str, Any]]:
    """A network, its calibration batches (``calib`` images, CamVid a tenth), one test image and its row's head."""
    title, build, dataset, side, _ = NETWORKS[name]
    base = build().eval()
    loader, test = data(dataset, calib // 10 if dataset == "camvid" else calib, 1)
    batches = resized(loader, side)
    x = test[0] if side is None else TF.interpolate(test[0], size=(side, side), mode="bilinear", align_corners=False)
    return base, batches, x, {"network": title, "key": name, "calib": sum(len(b[0]) for b in batches)}


def network_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one network."""
    base, batches, x, row = network_setup(name, args.calib)
    title, ignore = row["network"], NETWORKS[name][4]
    models = {}
    for method in ("direct", "dqa"):
        model = calibrated(base, DQAConfig(bits=3, method=method), batches, ignore)
        out, report = run_compressed(model, x)
        with torch.no_grad():
            if not torch.equal(out + 0.0, model(x) + 0.0):
                raise RuntimeError(f"{title}: the compressed output differs from fake quantization ({method})")
        models[method] = model
        into, outof = ends(report)
        row[f"{method}3"] = peaks(report.stored, into | outof)
        if method == "dqa":
            row["fp32"] = peaks(report.fp32, into | outof)
            row["int8"] = peaks(report.fp32, into | outof, scale=0.25)  # every float32 buffer at 1 byte per value
            row["input_kib"] = sum(b.nbytes for b in report.fp32.arena.buffers if b.name in into) / KIB
            row["output_kib"] = sum(b.nbytes for b in report.fp32.arena.buffers if b.name in outof) / KIB
            row["dqa3_live_kib"] = report.stored.live_bytes / KIB
            row["dqa3_peak_step"] = report.stored.step
            row["dqa3_peak_live"] = [[what, size / KIB] for what, size in report.stored.live[:4]]
            row["dqa3_bits_per_value"] = report.bits_per_value
    row["ms"] = timings(copy.deepcopy(base).eval(), models["dqa"], x, args.repeats)
    return row


TIMED = (("fp32", "FP32"), ("fake", "fake-quant"), ("once", "run_compressed"), ("runner", "CompressedRunner"))
BATCHES = (1, 8)


def timings(fp32_model: nn.Module, dqa: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of each pass of :data:`TIMED` at each batch of :data:`BATCHES` (``x`` repeated), interleaved.

    ``fake``: the fake-quantized forward; ``once``: :func:`run_compressed`, which traces the model at every call;
    ``runner``: a :class:`CompressedRunner` made beforehand (traced once, as a device plans its schedule ahead).
    """
    runner = CompressedRunner(dqa)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for batch in BATCHES:
            xb = x.expand(batch, *x.shape[1:]).contiguous()
            passes = {"fp32": partial(fp32_model, xb), "fake": partial(dqa, xb)}
            passes.update(once=partial(run_compressed, dqa, xb), runner=partial(runner, xb))
            for fn in passes.values():  # warm-up: first-call allocations and caches
                fn()
            ms: dict[str, list[float]] = {k: [] for k in passes}
            for _ in range(repeats):  # interleaved, so every pass sees the same machine
                for k, fn in passes.items():
                    ms[k] += timed(fn, 1)
            out[str(batch)] = {k: statistics.median(v) for k, v in ms.items()}
    return out


COLUMNS = (("fp32", "FP32"), ("int8", "all-int8"), ("direct3", "direct 3"), ("dqa3", "DQA 3"))


def format_tables(rows: list[dict[str, Any]]) -> str:
    """The three tables as aligned text."""
    w = 36
    head = f"{'network':<{w}}" + "".join(f"{c:>10}" for _, c in COLUMNS) + f"{'DQA3 live':>10}{'DQA3/FP32':>10}"
    lines = ["Peak activation KiB per image, every buffer in the arena (input and output included)", head]
    lines.append("-" * len(head))
    for r in rows:
        cells = "".join(f"{r[k]['all']:>10.1f}" for k, _ in COLUMNS)
        ratio = r["dqa3"]["all"] / r["fp32"]["all"]
        lines.append(f"{r['network']:<{w}}{cells}{r['dqa3_live_kib']:>10.1f}{ratio:>10.2f}")
    head = f"{'network':<{w}}{'input':>8}{'output':>8}" + "".join(f"{c:>10}" for _, c in COLUMNS)
    lines += ["", "The model input and the final output listed apart (FP32 KiB), the arena without them", head]
    lines.append("-" * len(head))
    for r in rows:
        cells = "".join(f"{r[k]['apart']:>10.1f}" for k, _ in COLUMNS)
        lines.append(f"{r['network']:<{w}}{r['input_kib']:>8.1f}{r['output_kib']:>8.2f}{cells}")
    for batch in BATCHES:
        head = f"{'network':<{w}}" + "".join(f"{c:>17}" for _, c in TIMED) + f"{'runner/FP32':>12}"
        title = f"Batch {batch}, one thread: ms per pass (DQA 3), median of interleaved repeats"
        lines += ["", title, head, "-" * len(head)]
        for r in rows:
            t = r["ms"][str(batch)]
            cells = "".join(f"{t[k]:>17.2f}" for k, _ in TIMED)
            lines.append(f"{r['network']:<{w}}{cells}{t['runner'] / t['fp32']:>11.1f}x")
    lines += [""]
    for r in rows:
        live = ", ".join(f"{what} {kib:.1f}" for what, kib in r["dqa3_peak_live"])
        lines.append(f"{r['network']}: DQA 3 peak at step {r['dqa3_peak_step']}: {live} KiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--calib", type=int, default=128, help="calibration images (CamVid: a tenth)")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats of each pass (the median is kept)")
    parser.add_argument("--out", default=None, help="write the figures as JSON (docs/results/peak_table.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    return run_all("peak_table.py", args, argv, lambda name: network_row(name, args), format_tables,
                   {"calib": args.calib, "repeats": args.repeats})  # fmt: skip


def run_all(
    script: str, args: argparse.Namespace, argv: list[str] | None, row: Callable[[str], dict[str, Any]],
    tables: Callable[[list[dict[str, Any]]], str], meta: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """``row(name)`` for every network of ``args.nets``; prints the tables and writes the JSON to ``args.out``."""
    command = f"OMP_NUM_THREADS=1 python examples/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    print("$ " + command.strip(), flush=True)
    rows = []
    for name in args.nets:
        start = time.perf_counter()
        rows.append(row(name))
        print(f"done: {rows[-1]['network']} ({time.perf_counter() - start:.0f} s)", flush=True)
    text = tables(rows)
    print(text)
    if args.out:
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        meta = {"command": command.strip(), **meta, "machine": machine}
        Path(args.out).write_text(json.dumps({**meta, "networks": rows, "text": text}, indent=1) + "\n")
    return rows

if __name__ == "__main__":
    main()
