"""Regenerate docs/RESULTS.md, its JSON and its plot for ResNet-32 on CIFAR-10.

Sections (each can be run alone; results merge into ``docs/results/resnet32_cifar10.json``):

* ``table1``: FP32, direct, NoisyQuant and DQA at 3, 4, 5 bits on the full test set, calibration on 5,000
  seeded-random training images, in the paper's setting and in this project's default setting.
* ``ablation``: channel selection at 3 bits (fisher, energy, saliency, max, random with 3 seeds; greedy
  against fisher on the same, smaller calibration set), default setting.
* ``sweeps``: r (0.1..0.9) and m (1..4) at 3 bits, default setting.
* ``uniform``: direct quantization at 3..8 bits, for the accuracy / measured-bits trade-off.
* ``overhead``: see ``examples/bench_overhead.py`` (run it; its JSON is merged when present).
* ``qat``: 3-bit DQA fine-tuned briefly with the callback.
* ``budget``: ``target_bits`` from 2.5 to 6 (per-layer n, r, m chosen by the allocation), full test set.

    python examples/make_report.py --sections table1 uniform qat           # table 1: under 30 min on 2 CPU cores
    python examples/make_report.py --sections ablation sweeps --ablation-test 2000
    python examples/make_report.py --render-only                          # rebuild RESULTS.md and the PNG
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch
from reproduce_paper import DEFAULT_DATA, DEFAULT_WEIGHTS, REPO, fine_tune_one, make_datamodule, quiet, run_one

OUT_DIR = REPO / "docs" / "results"
JSON_PATH = OUT_DIR / "resnet32_cifar10.json"
PNG_PATH = OUT_DIR / "tradeoff_resnet32.png"
MD_PATH = REPO / "docs" / "RESULTS.md"
NETWORK_JSONS = ("mobilenetv2_cifar10", "unet_camvid")  # written by report_networks.py


def _runs(dm: Any, calib: int, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        rec = run_one(arch="resnet32", weights=str(DEFAULT_WEIGHTS), datamodule=dm, calib_samples=calib, **spec)
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def section_table1(dm: Any, calib: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = [dict(method="fp32", bits=8, setting="default")]
    for setting in ("paper", "default"):
        for bits in (3, 4, 5):
            for method in ("direct", "noisyquant", "dqa"):
                specs.append(dict(method=method, bits=bits, setting=setting, ranking="fisher"))
    return _runs(dm, calib, specs)


def section_ablation(dm: Any, calib: int, greedy_calib: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for ranking in ("fisher", "energy", "saliency", "max"):
        specs.append(dict(method="dqa", bits=3, ranking=ranking, experiment="ranking"))
    for seed in (0, 1, 2):
        specs.append(dict(method="dqa", bits=3, ranking="random", seed=seed, experiment="ranking"))
    out = _runs(dm, calib, specs)
    same_calib = [
        dict(method="dqa", bits=3, ranking="fisher", experiment="ranking_greedy_calib"),
        dict(method="dqa", bits=3, ranking="greedy", experiment="ranking_greedy_calib"),
    ]
    return out + _runs(dm, greedy_calib, same_calib)


def section_sweeps(dm: Any, calib: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        specs.append(dict(method="dqa", bits=3, ratio=ratio, experiment="ratio"))
    for m in (1, 2, 3, 4):
        specs.append(dict(method="dqa", bits=3, extra_bits=m, experiment="extra_bits"))
    return _runs(dm, calib, specs)


def section_uniform(dm: Any, calib: int) -> list[dict[str, Any]]:
    return _runs(dm, calib, [dict(method="direct", bits=b, experiment="uniform") for b in (3, 4, 5, 6, 7, 8)])


BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)


def section_budget(dm: Any, calib: int) -> list[dict[str, Any]]:
    """DQA with per-layer widths chosen under each budget (``target_bits``); ``bits`` is then unused."""
    specs = [dict(method="dqa", bits=4, target_bits=t, experiment="budget") for t in BUDGETS]
    recs = _runs(dm, calib, specs)
    for rec, t in zip(recs, BUDGETS, strict=True):
        rec["target_bits"] = t
    return recs


def section_qat(args: argparse.Namespace) -> list[dict[str, Any]]:
    """3-bit DQA, learnable scales, fine-tuned with SGD for a fixed number of steps (BatchNorm statistics frozen)."""
    from lightning_dqa.demos.data import CIFAR10DataModule

    dm = CIFAR10DataModule(root=args.data_root, batch_size=128, eval_batch_size=500, seed=0)
    rec = fine_tune_one(
        arch="resnet32",
        weights=str(DEFAULT_WEIGHTS),
        datamodule=dm,
        bits=3,
        steps=args.qat_steps,
        lr=args.qat_lr,
        calib_samples=args.calib_samples,
        freeze_bn_stats=True,
    )
    print(json.dumps(rec), flush=True)
    return [rec]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="*", default=["table1", "uniform", "qat", "ablation", "sweeps", "budget"])
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--calib-samples", type=int, default=5000)
    parser.add_argument("--greedy-calib-samples", type=int, default=1000)
    parser.add_argument("--ablation-test", type=int, default=None, help="test images for ablation/uniform runs")
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--qat-lr", type=float, default=0.0002)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    quiet()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    if not args.render_only:
        full = make_datamodule(args.data_root, None, args.calib_samples, 0)
        part = make_datamodule(args.data_root, args.ablation_test, args.calib_samples, 0)
        for section in args.sections:
            start = time.perf_counter()
            if section == "table1":
                recs = section_table1(full, args.calib_samples)
            elif section == "ablation":
                recs = section_ablation(part, args.calib_samples, args.greedy_calib_samples)
            elif section == "sweeps":
                recs = section_sweeps(part, args.calib_samples)
            elif section == "uniform":
                recs = section_uniform(part, args.calib_samples)
            elif section == "qat":
                recs = section_qat(args)
            elif section == "budget":
                recs = section_budget(part, args.calib_samples)
            else:
                raise SystemExit(f"unknown section {section!r}")
            results[section] = {
                "records": recs,
                "seconds": round(time.perf_counter() - start, 1),
                "command": "python examples/make_report.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            }
            JSON_PATH.write_text(json.dumps(results, indent=1))
    write_report(results)


def write_report(results: dict[str, Any] | None = None) -> None:
    """Render docs/RESULTS.md and the PNG from the ResNet-32 JSON (read unless given) and the other networks'."""
    if results is None:
        results = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    overhead = OUT_DIR / "overhead_resnet32.json"
    if overhead.exists():
        results["overhead"] = json.loads(overhead.read_text())
    results["networks"] = {
        name: json.loads((OUT_DIR / f"{name}.json").read_text())
        for name in NETWORK_JSONS
        if (OUT_DIR / f"{name}.json").exists()
    }
    memory = OUT_DIR / "memory_networks.json"  # written by memory_report.py --out
    if memory.exists():
        results["memory"] = json.loads(memory.read_text())
    peak = OUT_DIR / "peak_table.json"  # written by peak_table.py --out
    if peak.exists():
        results["peak_table"] = json.loads(peak.read_text())
    extras = (
        ("objective_fronts", "objective_fronts.json"),
        ("shared_values", "shared_values.json"),
        ("peak_banded", "peak_banded.json"),
        ("shared_width", "shared_width.json"),
        ("skip_ranking", "skip_ranking.json"),
    )
    for key, name in extras:
        extra = OUT_DIR / name  # written by the scripts of the same names (examples/)
        if extra.exists():
            results[key] = json.loads(extra.read_text())
    from report_render import render

    MD_PATH.write_text(render(results, PNG_PATH))
    print(f"wrote {MD_PATH}, {JSON_PATH}, {PNG_PATH}")


if __name__ == "__main__":
    main()
