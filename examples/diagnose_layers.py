"""Why does MobileNetV2 lose so much in the paper setting at 3 bits? Per-layer and per-group diagnosis.

Everything runs on the committed MobileNetV2 (width 0.5, ``examples/checkpoints/mobilenetv2_w050_cifar10.pt``)
with the framework-free engine (:func:`lightning_dqa.prepare`, :func:`lightning_dqa.calibrate`) in the paper
setting (:func:`lightning_dqa.paper_config`: dynamic per-channel maxima over the batch, signed codes, no
clipping, every Conv2d/Linear *output* quantized, first and last included), r = 0.4, m = 3. DQA ranks channels
with ``fisher`` instead of the paper's ``greedy`` search, for speed (docs/RESULTS.md section 6 uses fisher too).

Tables printed:

(a) one layer quantized at a time (all others FP32), ``direct`` and ``dqa``: the layer's role (stem, expand,
    depthwise, project, head, classifier), its type (full conv, depthwise conv groups>1, pointwise 1x1,
    linear), what follows its output (``BN+ReLU6``, ``BN`` (linear bottleneck) or nothing), and the direct
    quantizer's relative error on a test batch measured on the conv output itself and after the following
    BatchNorm (what the next layer sees), plus the share of negative values in the conv output.
(b) every layer quantized except one group left in FP32.
(c) the paper setting with only ``code="auto"`` changed, and with only ``where="input"`` changed.

Usage (about 5 minutes on 2 CPU threads)::

    python examples/diagnose_layers.py --calib-samples 256 --test-samples 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_rankings import forward_fn, loss_fn, objective_fn  # the same calibration callables
from torch import Tensor, nn

from lightning_dqa import calibrate, paper_config, prepare
from lightning_dqa.core.attach import quantizers_of, set_quantizers_enabled
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.models import load_pretrained, mobilenetv2

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = REPO / "examples" / "checkpoints" / "mobilenetv2_w050_cifar10.pt"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"

Batch = tuple[Tensor, Tensor]


def stack(dataset: Any, batch_size: int) -> list[Batch]:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def fresh_model(weights: Path) -> nn.Module:
    net = mobilenetv2(num_classes=10, width_mult=0.5, dropout=0.0)
    return load_pretrained(net, weights, strip_prefixes=("module.", "net."), weights_only=False).eval()


def accuracy(model: nn.Module, batches: list[Batch]) -> float:
    with torch.inference_mode():
        correct = sum(int(objective_fn(forward_fn(model, b), b)) for b in batches)
    return 100.0 * correct / sum(len(b[1]) for b in batches)


def calibrated(weights: Path, config: DQAConfig, calib: list[Batch]) -> tuple[nn.Module, dict[str, Any]]:
    model = fresh_model(weights)
    prepare(model, config)
    calibrate(model, config, calib, forward_fn=forward_fn, loss_fn=loss_fn, objective_fn=objective_fn)
    return model, quantizers_of(model)


def only(quantizers: dict[str, Any], names: set[str]) -> None:
    """Quantize exactly the layers in ``names``; every other quantizer passes its tensor through."""
    for name, q in quantizers.items():
        q.enabled = name in names


# --------------------------------------------------------------------------- layer roles


def describe(model: nn.Module, name: str) -> dict[str, str]:
    """Role, type and what follows the output of quantized layer ``name`` in torchvision's MobileNetV2."""
    layer = model.get_submodule(name)
    parent_name, _, idx = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    siblings = list(parent.children())
    after = siblings[int(idx) + 1 :] if idx.isdigit() else []
    if isinstance(layer, nn.Linear):
        kind, follows = "linear", "-"
    elif layer.groups > 1:
        kind = "depthwise"
    elif layer.kernel_size == (1, 1):
        kind = "pointwise"
    else:
        kind = "full conv"
    if kind != "linear":
        acts = [m for m in after if isinstance(m, nn.ReLU6)]
        follows = "BN+ReLU6" if acts else "BN"
    if name == "features.0.0":
        role = "stem"
    elif kind == "linear":
        role = "classifier"
    elif kind == "depthwise":
        role = "depthwise"
    elif follows == "BN":
        role = "project"
    elif ".conv." in name:
        role = "expand"
    else:
        role = "head"
    return {"role": role, "type": kind, "follows": follows}


def bn_after(model: nn.Module, name: str) -> nn.Module | None:
    parent_name, _, idx = name.rpartition(".")
    siblings = list(model.get_submodule(parent_name).children())
    nxt = siblings[int(idx) + 1] if idx.isdigit() and int(idx) + 1 < len(siblings) else None
    return nxt if isinstance(nxt, nn.BatchNorm2d) else None


def layer_errors(model: nn.Module, quantizers: dict[str, Any], batch: Batch) -> dict[str, dict[str, float]]:
    """Per-layer quantization error on one FP32 pass.

    Relative error ||Q(x)-x||^2/||x||^2 of the conv output, the same after the following BatchNorm (and after
    ReLU6 where one follows), and the share of negative conv outputs.
    """
    out: dict[str, dict[str, float]] = {}
    handles = []
    for name, q in quantizers.items():
        layer = model.get_submodule(name)
        bn = bn_after(model, name)
        relu = describe(model, name)["follows"] == "BN+ReLU6"

        def hook(_m: nn.Module, _a: Any, x: Tensor, name: str = name, q: Any = q, bn: Any = bn, relu: bool = relu):
            xq = q.quantize_values(x)
            rel = lambda a, b: float(((a - b) ** 2).sum() / (b**2).sum().clamp_min(1e-30))  # noqa: E731
            rec = {"err_out": rel(xq, x), "neg": float((x < 0).float().mean()), "zero": float((xq == 0).float().mean())}
            dims = [d for d in range(x.dim()) if d != 1]
            std = x.std(dim=dims).clamp_min(1e-12)
            rec["max_std"] = float((x.abs().amax(dim=dims) / std).median())
            if bn is not None:
                y, yq = bn(x), bn(xq)
                rec["err_bn"] = rel(yq, y)
                if relu:
                    rec["err_act"] = rel(F.relu6(yq), F.relu6(y))
            out[name] = rec

        handles.append(layer.register_forward_hook(hook))
    set_quantizers_enabled(model, False)
    with torch.inference_mode():
        forward_fn(model, batch)
    for h in handles:
        h.remove()
    return out


# --------------------------------------------------------------------------- tables


def table_a(rows: list[dict[str, Any]], fp32: float) -> str:
    head = (
        f"{'#':>3} {'layer':<22}{'role':<11}{'type':<10}{'output ->':<10}{'ch':>5}{'neg %':>7}"
        f"{'->0 %':>7}{'max/sd':>8}{'err out':>9}{'err BN':>9}{'err act':>9}{'direct':>8}{'dqa':>8}"
    )
    lines = [head, "-" * len(head)]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for i, r in enumerate(rows):
        lines.append(
            f"{i:>3} {r['name']:<22}{r['role']:<11}{r['type']:<10}{r['follows']:<10}{r['ch']:>5}"
            f"{100 * r['neg']:>7.1f}{100 * r['zero']:>7.1f}{r['max_std']:>8.1f}"
            f"{f(r['err_out']):>9}{f(r.get('err_bn')):>9}{f(r.get('err_act')):>9}"
            f"{r['direct'] - fp32:>8.2f}{r['dqa'] - fp32:>8.2f}"
        )
    return "\n".join(lines)


def table_by_role(rows: list[dict[str, Any]], fp32: float) -> str:
    head = f"{'role':<11}{'layers':>7}{'mean err BN':>13}{'sum drop direct':>17}{'sum drop dqa':>14}{'worst dqa':>11}"
    lines = [head, "-" * len(head)]
    for role in ("stem", "expand", "depthwise", "project", "head", "classifier"):
        sel = [r for r in rows if r["role"] == role]
        if not sel:
            continue
        errs = [r["err_bn"] for r in sel if r.get("err_bn") is not None]
        mean_err = f"{sum(errs) / len(errs):.3f}" if errs else "-"
        lines.append(
            f"{role:<11}{len(sel):>7}{mean_err:>13}{sum(fp32 - r['direct'] for r in sel):>17.2f}"
            f"{sum(fp32 - r['dqa'] for r in sel):>14.2f}{max(fp32 - r['dqa'] for r in sel):>11.2f}"
        )
    return "\n".join(lines)


def table_runs(rows: list[tuple[str, float, float]], fp32: float) -> str:
    head = f"{'run':<84}{'direct %':>10}{'dqa %':>9}{'drop direct':>13}{'drop dqa':>10}"
    lines = [head, "-" * len(head)]
    for label, d, q in rows:
        lines.append(f"{label:<84}{d:>10.2f}{q:>9.2f}{fp32 - d:>13.2f}{fp32 - q:>10.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--test-samples", type=int, default=1000, help="the first N CIFAR-10 test images")
    parser.add_argument("--batch-size", type=int, default=500, help="eval batch (dynamic maxima are per batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, nargs="*", default=[50, 1], help="extra eval batch sizes in (c)")
    parser.add_argument("--skip-single", action="store_true", help="skip table (a) (the slow part)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    weights = Path(args.weights)

    dm = CIFAR10DataModule(root=args.data_root, limit_test=args.test_samples, seed=0)
    dm.setup("validate")
    test = stack(dm.val_set, args.batch_size)
    calib = stack(dm.calibration_subset(args.calib_samples, seed=0), 64)

    fp32 = accuracy(fresh_model(weights), test)
    print(f"MobileNetV2-0.5, first {args.test_samples} test images, batch {args.batch_size}; FP32 {fp32:.2f} %")
    print(f"paper setting, {args.bits} bits, r=0.4, m=3, DQA ranking = fisher (not greedy, for speed); "
          f"{args.calib_samples} calibration images\n")  # fmt: skip

    configs = {m: paper_config(args.bits, method=m, ranking="fisher") for m in ("direct", "dqa")}
    models = {m: calibrated(weights, c, calib) for m, c in configs.items()}
    names = list(models["direct"][1])
    info = {n: describe(models["direct"][0], n) for n in names}
    all_q = {m: accuracy(models[m][0], test) for m in models}

    # (b) one group in FP32, all other layers quantized
    groups = {
        "none (every layer quantized)": set(),
        "depthwise outputs": {n for n in names if info[n]["role"] == "depthwise"},
        "expansion outputs": {n for n in names if info[n]["role"] == "expand"},
        "projection outputs (linear bottleneck)": {n for n in names if info[n]["role"] == "project"},
        "first + last layer (stem conv, classifier)": {n for n in names if info[n]["role"] in ("stem", "classifier")},
        "head 1x1 conv (to 1280)": {n for n in names if info[n]["role"] == "head"},
        "first 6 layers (features.0-2)": set(names[:6]),
        "first 6 layers + classifier": set(names[:6]) | {names[-1]},
        "every output followed by BN+ReLU6": {n for n in names if info[n]["follows"] == "BN+ReLU6"},
        "every output followed by BN only": {n for n in names if info[n]["follows"] == "BN"},
    }
    rows_b = []
    for label, keep_fp in groups.items():
        accs = []
        for m in ("direct", "dqa"):
            model, qs = models[m]
            only(qs, set(names) - keep_fp)
            accs.append(accuracy(model, test))
        rows_b.append((f"FP32: {label} ({len(keep_fp)} layers)", accs[0], accs[1]))
    print("(b) every layer quantized except one group left in FP32")
    print(table_runs(rows_b, fp32), "\n", flush=True)

    # (c) one choice of the paper setting changed
    rows_c = [("paper setting", all_q["direct"], all_q["dqa"])]
    variants = {
        'code="auto" (unsigned grid where calibration saw x >= 0)': {"code": "auto"},
        'where="input" (image at n bits too)': {"where": "input"},
        'where="input", first_layer_bits=8 (image at 8 bits)': {"where": "input", "first_layer_bits": 8},
        'where="input", code="auto"': {"where": "input", "code": "auto"},
        'scale_mode="static" (calibration maxima), clipping="none"': {"scale_mode": "static"},
        'scale_mode="static", clipping="mse"': {"scale_mode": "static", "clipping": "mse"},
        "all of the default setting (static, mse, auto, input, image 8 bits)": dict(
            scale_mode="static", clipping="mse", code="auto", where="input", first_layer_bits=8
        ),
    }
    unsigned_counts = {}
    for label, change in variants.items():
        accs = []
        for m in ("direct", "dqa"):
            model, qs = calibrated(weights, configs[m].replace(**change), calib)
            unsigned_counts[label] = sum(not q.is_signed for q in qs.values())
            accs.append(accuracy(model, test))
        rows_c.append((f"{label} [{unsigned_counts[label]}/{len(qs)} unsigned]", accs[0], accs[1]))
    for m in models:
        only(models[m][1], set(names))
    images, labels = (torch.cat(t) for t in zip(*test, strict=True))
    for size in args.eval_batches:
        batched = list(zip(images.split(size), labels.split(size), strict=True))
        rows_c.append((f"paper setting, eval batch {size} (dynamic maxima over {size} images)",
                       accuracy(models["direct"][0], batched), accuracy(models["dqa"][0], batched)))  # fmt: skip
    print("(c) the paper setting with one choice changed")
    print(table_runs(rows_c, fp32), "\n", flush=True)

    if args.skip_single:
        return
    # (a) one layer at a time
    errors = layer_errors(models["direct"][0], models["direct"][1], test[0])
    rows_a = []
    for n in names:
        rec: dict[str, Any] = {"name": n, **info[n], **errors[n], "ch": models["direct"][1][n].num_channels}
        for m in ("direct", "dqa"):
            model, qs = models[m]
            only(qs, {n})
            rec[m] = accuracy(model, test)
        rows_a.append(rec)
    print("(a) one layer quantized at a time (others FP32): accuracy change in points vs FP32;")
    print("    err = relative squared error of the direct 3-bit quantizer on test batch 0, measured on the")
    print("    conv output (err out), after the following BatchNorm (err BN), after BN+ReLU6 (err act);")
    print("    neg % = share of negative values in the (pre-BN) conv output that the paper quantizes;")
    print("    ->0 % = share of those values the direct quantizer rounds to code 0; max/sd = median over channels")
    print("    of the channel's maximum |x| over the batch divided by its standard deviation")
    print(table_a(rows_a, fp32), "\n")
    print("(a') table (a) summed by role (sum of single-layer drops, not additive in general)")
    print(table_by_role(rows_a, fp32))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
