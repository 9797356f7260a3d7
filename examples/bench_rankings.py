"""Time each channel ranking's calibration on the pretrained ResNet-32, next to a plain FP32 pass.

For every ranking a fresh ResNet-32 gets quantizers (:func:`lightning_dqa.core.attach.prepare`) and is calibrated
on the same in-memory calibration batches (:func:`lightning_dqa.calibrate`); the wall time of that call
is printed next to the time of one plain calibration pass (an FP32 forward over the same samples, no
quantizers) measured in the same run, and their ratio. Data loading is excluded from both: the calibration
images (a seeded random subset of the CIFAR-10 training set) are decoded once beforehand.

``--speedup`` times the greedy search itself (:func:`lightning_dqa.calibration.greedy.greedy_rank`) with the fast path
(fx partition + batched candidates, for each ``--samples-per-pass``) against the plain loop (one full forward
pass per candidate), and checks that they give the same scores.

Usage::

    python examples/bench_rankings.py --calib-samples 1000 --bits 3 --rankings fisher energy saliency random greedy
    python examples/bench_rankings.py --speedup --calib-samples 256 --samples-per-pass auto 128 512
    python examples/bench_rankings.py --paper ...   # the paper's quantizer (dynamic scales, layer outputs)

The weights are akamaster/pytorch_resnet_cifar10's ``resnet32-d509ac18.th`` (BSD 2-Clause, (c) 2018 Yerlan
Idelbayev).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dqa import DQAConfig, paper_config
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.calibration.greedy import greedy_rank
from lightning_dqa.core.attach import prepare, quantizers_of, set_quantizers_enabled
from lightning_dqa.demos.models import load_pretrained, resnet32

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Batch = tuple[Tensor, Tensor]


def forward_fn(model: nn.Module, batch: Batch) -> Tensor:
    return model(batch[0])


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


def objective_fn(output: Tensor, batch: Batch) -> Tensor:
    return (output.argmax(1) == batch[1]).sum()


def load_batches(data: Path, samples: int, batch_size: int, seed: int, train: bool = True) -> list[Batch]:
    """``samples`` random CIFAR-10 images (seeded), normalized as the weights expect, in batches."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.CIFAR10(str(data), train=train, download=False, transform=tf)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    images = torch.stack([ds[i][0] for i in idx])  # (S, 3, 32, 32)
    labels = torch.tensor([ds[i][1] for i in idx])  # (S,)
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def fresh_model(weights: Path) -> nn.Module:
    return load_pretrained(resnet32(), weights, weights_only=False).eval()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fp32_pass(model: nn.Module, batches: list[Batch]) -> float:
    """Seconds of one FP32 forward over the calibration batches (the best of three, after a warm-up)."""
    with torch.inference_mode():
        forward_fn(model, batches[0])
        return min(timed(lambda: [forward_fn(model, b) for b in batches])[0] for _ in range(3))


def make_config(args: argparse.Namespace, ranking: str) -> DQAConfig:
    if args.paper:
        return paper_config(args.bits, ranking=ranking, ratio=args.ratio)
    return DQAConfig(bits=args.bits, ranking=ranking, ratio=args.ratio)


def accuracy(model: nn.Module, batches: list[Batch]) -> float:
    with torch.inference_mode():
        correct = sum(int(objective_fn(forward_fn(model, b), b)) for b in batches)
    return 100.0 * correct / sum(len(b[1]) for b in batches)


def calibrate_with(args: argparse.Namespace, config: DQAConfig, batches: list[Batch]) -> tuple[float, Any, nn.Module]:
    """Seconds of :func:`calibrate` on a fresh model with ``config``, its report, and the calibrated model."""
    model = fresh_model(args.weights)
    prepare(model, config)
    seconds, report = timed(
        lambda: calibrate(model, config, batches, forward_fn=forward_fn, loss_fn=loss_fn, objective_fn=objective_fn)
    )
    return seconds, report, model


def bench_rankings(args: argparse.Namespace, batches: list[Batch], test: list[Batch]) -> None:
    """Each ranking's calibration against one calibration pass without ranking and a plain FP32 pass."""
    base = fp32_pass(fresh_model(args.weights), batches)
    samples = sum(len(b[1]) for b in batches)
    # One calibration pass: the same statistics pass and scale freezing, direct quantization (nothing ranked).
    calib, _, _ = calibrate_with(args, make_config(args, "fisher").replace(method="direct"), batches)
    print(f"plain FP32 forward over the {samples} calibration samples: {base:.3f} s")
    print(f"one calibration pass (statistics + frozen scales, no ranking): {calib:.3f} s")
    head = f"{'ranking':<10}{'seconds':>10}{'stats s':>10}{'rank s':>10}{'x calib pass':>14}{'x FP32 pass':>13}"
    print(head + (f"{'test acc %':>12}" if test else ""))
    for ranking in args.rankings:
        seconds, report, model = calibrate_with(args, make_config(args, ranking), batches)
        row = f"{ranking:<10}{seconds:>10.2f}{report.stats_seconds:>10.2f}{report.rank_seconds:>10.2f}"
        row += f"{seconds / calib:>14.2f}{seconds / base:>13.1f}"
        print(row + (f"{accuracy(model, test):>12.2f}" if test else ""), flush=True)


def bench_speedup(args: argparse.Namespace, batches: list[Batch]) -> None:
    """Fast greedy path(s) against the plain per-candidate loop on the same pre-ranking state."""
    model = fresh_model(args.weights)
    config = make_config(args, "greedy").replace(ratio=0.0)  # ratio 0: calibrate freezes scales, no ranking
    prepare(model, config)
    report = calibrate(model, config, batches, forward_fn=forward_fn)
    set_quantizers_enabled(model, False)
    quantizers = quantizers_of(model)
    base = fp32_pass(model, batches)
    candidates = sum(q.num_channels for q in quantizers.values() if not q.passthrough)
    print(f"{candidates} candidate channels; plain FP32 pass over {report.samples} samples: {base:.3f} s")
    results = {}
    for spp in args.samples_per_pass:
        seconds, scores = timed(
            lambda s=spp: greedy_rank(
                model, quantizers, report.order, batches, forward_fn, objective_fn, samples_per_pass=s
            )
        )
        results[spp] = scores
        label = f"fast path, samples_per_pass={spp or 'auto'}"
        print(f"{label:<36}: {seconds:8.1f} s ({seconds / base:6.1f} x FP32 pass)", flush=True)
    if args.skip_reference:
        return
    ref_seconds, ref = timed(
        lambda: greedy_rank(model, quantizers, report.order, batches, forward_fn, objective_fn, fast=False)
    )
    print(f"{'plain loop (reference)':<36}: {ref_seconds:8.1f} s ({ref_seconds / base:6.1f} x FP32 pass)")
    for spp, scores in results.items():
        differ = [n for n in ref if not torch.equal(ref[n], scores[n])]
        worst = max((float((ref[n] - scores[n]).abs().max()) for n in differ), default=0.0)
        print(
            f"samples_per_pass={spp or 'auto'}: layers whose scores differ from the reference: {len(differ)} "
            f"(largest difference {worst:g} correct predictions)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128, help="calibration batch size (the paper's 128)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rankings", nargs="+", default=["fisher", "energy", "saliency", "random", "greedy"])
    p.add_argument("--paper", action="store_true", help="the paper's quantizer instead of the project default")
    p.add_argument("--test-samples", type=int, default=0, help="also report test accuracy on this many images")
    p.add_argument("--speedup", action="store_true", help="time the greedy fast path against the plain loop")
    p.add_argument(
        "--samples-per-pass",
        type=lambda v: None if v == "auto" else int(v),
        nargs="+",
        default=[None],
        help="rows per candidate pass of the fast path; 'auto' sizes them by bytes (the default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-reference", action="store_true", help="with --speedup: do not run the plain loop")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "resnet32-d509ac18.th")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bits={args.bits}, "
        f"{'paper' if args.paper else 'default'} quantizer, batch {args.batch_size}"
    )
    batches = load_batches(args.data, args.calib_samples, args.batch_size, args.seed)
    if args.speedup:
        bench_speedup(args, batches)
        return
    test = load_batches(args.data, args.test_samples, 500, args.seed, train=False) if args.test_samples else []
    bench_rankings(args, batches, test)


if __name__ == "__main__":
    main()
