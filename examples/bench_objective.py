"""The memory budget's objective: the module's own loss against the label-free output objective (issue 20).

For each network and budget (``target_bits``), the per-layer widths are chosen from the Fisher statistics of one
objective, and the quantized network is evaluated on the full test set:

* ``training_step``: the module's own loss (the demos' cross-entropy; the U-Net's is class-weighted with the
  void label ignored): the callback's default when the module has one;
* ``cross_entropy``: unweighted cross-entropy against the labels (0.2's default; on ResNet-32 it is the same
  loss as ``training_step``, so it is not run there);
* ``output``: the label-free objective (KL from the FP32 logits; per pixel for the U-Net).

Uniform direct quantization at 2, 3 and 4 bits (no objective involved) is run beside them as the reference front.

Usage::

    python examples/bench_objective.py                      # both networks (about 45 min on 2 cores)
    python examples/bench_objective.py --nets resnet32 --budgets 3.0 3.5
    python examples/bench_objective.py --json docs/results/objective_fronts.json

Needs ``../shared`` (CIFAR-10, CamVid, the ResNet-32 weights) and the U-Net checkpoint in ``examples/checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from reproduce_paper import DEFAULT_WEIGHTS, REPO, SHARED, quiet, run_one

from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule

NETS: dict[str, dict[str, Any]] = {
    "resnet32": dict(
        arch="resnet32", weights=str(DEFAULT_WEIGHTS), model_kwargs=None, stage="validate", calib=5000,
        objectives=(("training_step", "auto"), ("output", "auto")), callback={},
        score="accuracy",
    ),
    "unet": dict(
        arch="unet", weights=str(REPO / "examples" / "checkpoints" / "unet_w16_camvid.pt"),
        model_kwargs={"base_width": 16, "depth": 4, "channels_last": True}, stage="test", calib=100,
        objectives=(("training_step", "auto"), ("cross_entropy", "auto"), ("output", "kl")),
        callback={"ignore_index": 11}, score="miou",
    ),
}  # fmt: skip


def datamodule(net: str) -> Any:
    if net == "unet":
        return CamVidDataModule(root=str(SHARED / "data" / "camvid"), batch_size=8, eval_batch_size=16)
    return CIFAR10DataModule(root=str(SHARED / "data" / "cifar10"), batch_size=128, eval_batch_size=500)


def runs(
    net: str, budgets: list[float], objectives: list[str] | None = None, uniform: bool = True
) -> list[dict[str, Any]]:
    """Records of the uniform direct runs and of every (objective, budget) pair of one network.

    ``objectives`` as ``name:divergence`` strings (e.g. ``output:mse``); default: the network's list.
    """
    spec, dm = NETS[net], datamodule(net)
    pairs = [tuple(o.split(":")) for o in objectives] if objectives else list(spec["objectives"])
    common = dict(
        arch=spec["arch"], weights=spec["weights"], datamodule=dm, model_kwargs=spec["model_kwargs"],
        stage=spec["stage"], calib_samples=spec["calib"], **spec["callback"],
    )  # fmt: skip
    plan: list[dict[str, Any]] = [dict(method="direct", bits=b) for b in (2, 3, 4)] if uniform else []
    for objective, divergence in pairs:
        for t in budgets:
            plan.append(
                dict(method="dqa", bits=4, target_bits=t, objective=objective, output_divergence=divergence)
            )
    out = []
    for p in plan:
        start = time.perf_counter()
        rec = run_one(**common, **p)
        label = None if "objective" not in p else f"{p['objective']}:{p['output_divergence']}"
        rec.update(net=net, objective=label, target_bits=p.get("target_bits"),
                   seconds=round(time.perf_counter() - start, 1))  # fmt: skip
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def table(records: list[dict[str, Any]], net: str) -> str:
    score = NETS[net]["score"]
    rows = [r for r in records if r["net"] == net]
    lines = [f"{net}: {score} % by target bits (measured bits per value in brackets)", ""]
    budgets = sorted({r["target_bits"] for r in rows if r["target_bits"] is not None})
    objectives = list(dict.fromkeys(r["objective"] for r in rows if r["objective"]))
    lines.append("| target bits | " + " | ".join(objectives) + " |")
    lines.append("|---" * (len(objectives) + 1) + "|")
    for t in budgets:
        cells = []
        for o in objectives:
            r = next(r for r in rows if r["objective"] == o and r["target_bits"] == t)
            cells.append(f"{r[score]:.2f} ({r['bits_per_value']:.3f})")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("uniform direct: " + ", ".join(
        f"{r['bits']} bits {r[score]:.2f} ({r['bits_per_value']:.3f})" for r in rows if r["method"] == "direct"
    ))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0])
    parser.add_argument("--objectives", nargs="+", default=None, help="name:divergence pairs, e.g. output:mse")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform direct reference runs")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    if not (SHARED / "data").is_dir():
        sys.exit(f"needs the shared data at {SHARED}")
    quiet()
    start = time.perf_counter()
    records = [rec for net in args.nets for rec in runs(net, args.budgets, args.objectives, not args.no_uniform)]
    for net in args.nets:
        print(table(records, net), "\n")
    took = (time.perf_counter() - start) / 60
    print(f"({took:.1f} min; {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
