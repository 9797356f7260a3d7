"""Render docs/RESULTS.md and the trade-off PNG from the results JSON written by make_report.py."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from report_memory import memory_section
from report_sections import banded_section, objective_section, shared_section, width_section

PAPER_3BIT = {"fp32": 92.49, "direct": 52.85, "noisyquant": 71.22, "dqa": 82.13}
TARGETS = {3: 89.5, 4: 92.0, 5: 92.4}
METHOD_NAMES = {"fp32": "FP32", "direct": "direct", "noisyquant": "NoisyQuant", "dqa": "DQA"}


def _records(results: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return results.get(section, {}).get("records", [])


def _meta(results: dict[str, Any], section: str) -> str:
    sec = results.get(section, {})
    if not sec:
        return ""
    return f"Command: `{sec['command']}` ({sec['seconds'] / 60:.1f} min; {sec['machine']})."


def _per_tensor_saving(record: dict[str, Any]) -> float:
    """The quantized tensors' saving against FP32; records written before 0.2 named it ``memory_saving``."""
    return float(record["per_tensor_saving"] if "per_tensor_saving" in record else record["memory_saving"])


def _table1(results: dict[str, Any]) -> list[str]:
    recs = _records(results, "table1")
    if not recs:
        return ["_Not run yet._"]
    fp32 = next(r for r in recs if r["method"] == "fp32")
    lines = []
    for setting, title in (("paper", "Paper setting"), ("default", "lightning_dqa default setting")):
        lines += [
            f"**{title}** (FP32: {fp32['accuracy']:.2f} %, 32 bits/value, "
            f"{fp32['activation_kib_per_image']:.1f} KiB of quantized-point activations per image)",
            "",
            "| method | bits | top-1 % | measured bits/value | KiB/image | per-tensor saving | paper (3-bit) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            if r["setting"] != setting or r["method"] == "fp32":
                continue
            paper = f"{PAPER_3BIT[r['method']]:.2f}" if r["bits"] == 3 else ""
            lines.append(
                f"| {METHOD_NAMES[r['method']]} | {r['bits']} | {r['accuracy']:.2f} | {r['bits_per_value']:.3f} | "
                f"{r['activation_kib_per_image']:.1f} | {100 * _per_tensor_saving(r):.1f} % | {paper} |"
            )
        lines.append("")
    lines.append(_meta(results, "table1"))
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    recs = [r for r in _records(results, "table1") if r["method"] == "dqa" and r["setting"] == "default"]
    lines = ["| target | measured | met |", "|---|---|---|"]
    for r in sorted(recs, key=lambda r: r["bits"]):
        t = TARGETS[r["bits"]]
        ok = "yes" if r["accuracy"] >= t else f"no, short by {t - r['accuracy']:.2f} points"
        lines.append(f"| {r['bits']}-bit DQA PTQ >= {t} % | {r['accuracy']:.2f} % | {ok} |")
    for r in _records(results, "qat"):
        ok = "yes" if r["accuracy"] >= 92.0 else f"no, short by {92.0 - r['accuracy']:.2f} points"
        lines.append(f"| 3-bit after fine-tuning >= 92.0 % | {r['accuracy']:.2f} % | {ok} |")
    if "table1" in results:
        minutes = results["table1"]["seconds"] / 60
        lines.append(f"| table 1 in < 30 min | {minutes:.1f} min | {'yes' if minutes < 30 else 'no'} |")
    return lines


def _ablation(results: dict[str, Any]) -> list[str]:
    recs = _records(results, "ablation") + _records(results, "sweeps")
    if not recs:
        return ["_Not run yet._"]
    out = [
        "| experiment | ranking | r | m | seed | calib images | test images | top-1 % | bits/value | rank+calib s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        out.append(
            f"| {r.get('experiment', '')} | {r['ranking']} | {r['ratio']} | {r['extra_bits']} | {r['seed']} | "
            f"{r['calib_samples']} | {r['test_images']} | {r['accuracy']:.2f} | {r['bits_per_value']:.3f} | "
            f"{r['calib_seconds']:.1f} |"
        )
    out += ["", *_ablation_summary(recs), "", _meta(results, "ablation"), "", _meta(results, "sweeps")]
    return out


def _ablation_summary(recs: list[dict[str, Any]]) -> list[str]:
    """Plain statements computed from the ablation records (what a reader would otherwise work out)."""
    ranked = [r for r in recs if r.get("experiment") == "ranking"]
    if not ranked:
        return []
    random = [r["accuracy"] for r in ranked if r["ranking"] == "random"]
    best = max((r for r in ranked if r["ranking"] != "random"), key=lambda r: r["accuracy"])
    lines = []
    if random:
        mean = sum(random) / len(random)
        spread = f"{min(random):.2f}..{max(random):.2f}"
        lines.append(
            f"- Random selection ({len(random)} seeds) averages {mean:.2f} % ({spread}); the best ranking, "
            f"{best['ranking']}, reaches {best['accuracy']:.2f} % at the same r and m, so selection is worth about "
            f"{best['accuracy'] - mean:.2f} points at 3 bits here."
        )
    same = {r["ranking"]: r for r in recs if r.get("experiment") == "ranking_greedy_calib"}
    if "greedy" in same and "fisher" in same:
        g, f = same["greedy"], same["fisher"]
        verdict = "better than" if g["accuracy"] > f["accuracy"] else "no better than"
        lines.append(
            f"- On the same {g['calib_samples']} calibration images the paper's greedy search gives "
            f"{g['accuracy']:.2f} % against fisher's {f['accuracy']:.2f} %, at "
            f"{g['calib_seconds'] / max(f['calib_seconds'], 1e-9):.0f}x its calibration time: choosing channels by "
            f"correct calibration predictions, one at a time, transfers {verdict} the one-pass gradient ranking."
        )
    ratio = sorted((r for r in recs if r.get("experiment") == "ratio"), key=lambda r: r["ratio"])
    if ratio:
        lines.append(
            f"- r from {ratio[0]['ratio']} to {ratio[-1]['ratio']}: {ratio[0]['accuracy']:.2f} -> "
            f"{ratio[-1]['accuracy']:.2f} % for {ratio[0]['bits_per_value']:.2f} -> {ratio[-1]['bits_per_value']:.2f} "
            "measured bits per value; section 3 puts these points against uniform quantization."
        )
    extra = sorted((r for r in recs if r.get("experiment") == "extra_bits"), key=lambda r: r["extra_bits"])
    if extra:
        pairs = ", ".join(f"m={r['extra_bits']}: {r['accuracy']:.2f} % at {r['bits_per_value']:.2f}" for r in extra)
        lines.append(f"- m sweep ({pairs} bits/value).")
    return lines


def _uniform_curve(results: dict[str, Any]) -> list[tuple[float, float]]:
    pts = [(r["bits_per_value"], r["accuracy"]) for r in _records(results, "uniform")]
    return sorted(pts)


def _interp(curve: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def _tradeoff(results: dict[str, Any], png: Path) -> list[str]:
    curve = _uniform_curve(results)
    dqa = [r for r in _records(results, "table1") if r["method"] == "dqa" and r["setting"] == "default"]
    # only points measured on the same test images as the uniform curve are compared with it
    same = {r["test_images"] for r in _records(results, "uniform")}
    dqa += [r for r in _records(results, "sweeps") if r["test_images"] in same]
    # the sweeps repeat the default point (r = 0.4, m = 3); keep one record per configuration
    dqa = list({(r["bits"], r["ratio"], r["extra_bits"]): r for r in reversed(dqa)}.values())
    if not curve or not dqa:
        return ["_Needs the uniform and table1 sections._"]
    lines = [
        "| DQA point | bits/value | top-1 % | uniform at equal bits (interpolated) | DQA - uniform |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(dqa, key=lambda r: r["bits_per_value"]):
        u = _interp(curve, r["bits_per_value"])
        label = f"n={r['bits']} r={r['ratio']} m={r['extra_bits']}"
        if u is None:
            lines.append(f"| {label} | {r['bits_per_value']:.3f} | {r['accuracy']:.2f} | outside the curve | |")
        else:
            lines.append(
                f"| {label} | {r['bits_per_value']:.3f} | {r['accuracy']:.2f} | {u:.2f} | {r['accuracy'] - u:+.2f} |"
            )
    gains = [(r, r["accuracy"] - u) for r in dqa if (u := _interp(curve, r["bits_per_value"])) is not None]
    behind = [f"n={r['bits']} r={r['ratio']} m={r['extra_bits']} ({d:+.2f})" for r, d in gains if d <= 0]
    ahead = [f"n={r['bits']} r={r['ratio']} m={r['extra_bits']} ({d:+.2f})" for r, d in gains if d > 0]
    lines += [
        "",
        "Plainly: at equal measured memory DQA is ahead of uniform quantization at "
        + (", ".join(ahead) or "no point")
        + ("; it is behind or level at " + ", ".join(behind) if behind else "; no point is behind or level")
        + ". Differences under about half a point are within the sampling noise of 10,000 test images (the standard"
        " error of one accuracy near 92 % is 0.27 points).",
    ]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        ax.plot([p[0] for p in curve], [p[1] for p in curve], "o-", label="uniform n-bit (direct), n = 3..8")
        ax.scatter([r["bits_per_value"] for r in dqa], [r["accuracy"] for r in dqa], color="C3", zorder=3, label="DQA")
        for r in dqa:
            ax.annotate(
                f"n{r['bits']} r{r['ratio']} m{r['extra_bits']}",
                (r["bits_per_value"], r["accuracy"]),
                fontsize=6,
                xytext=(3, -8),
                textcoords="offset points",
            )
        budget = _records(results, "budget")
        if budget:
            ax.plot(
                [r["bits_per_value"] for r in sorted(budget, key=lambda r: r["target_bits"])],
                [r["accuracy"] for r in sorted(budget, key=lambda r: r["target_bits"])],
                "s-", color="C2", zorder=4, label="DQA, per-layer widths under target_bits (section 3b)",
            )
        fp32 = next((r for r in _records(results, "table1") if r["method"] == "fp32"), None)
        if fp32:
            ax.axhline(fp32["accuracy"], color="gray", ls="--", lw=0.8, label=f"FP32 {fp32['accuracy']:.2f} %")
        ax.set_xlabel("measured bits per activation value (Huffman-coded errors and side info included)")
        ax.set_ylabel("top-1 % (CIFAR-10 test)")
        ax.set_title("ResNet-32: accuracy against measured activation memory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
        lines += ["", f"![trade-off]({png.relative_to(png.parents[1]).as_posix()})"]
    except ImportError:
        lines += ["", "_matplotlib is not installed: no plot._"]
    return lines


def _vs(curve: list[tuple[float, float]], r: dict[str, Any], score: str) -> str:
    """``curve`` interpolated at ``r``'s measured bits and ``r``'s difference to it; blank outside the curve."""
    y = _interp(curve, r["bits_per_value"])
    return "" if y is None else f"{y:.2f} ({r[score] - y:+.2f})"


def _fixed_r_curve(results: dict[str, Any]) -> list[tuple[float, float]]:
    """Fixed-ratio DQA (r = 0.4, m = 3, every layer at n = 3, 4, 5: table 1's default rows)."""
    recs = [r for r in _records(results, "table1") if r["method"] == "dqa" and r["setting"] == "default"]
    return sorted((r["bits_per_value"], r["accuracy"]) for r in recs)


def _budget(results: dict[str, Any]) -> list[str]:
    recs = sorted(_records(results, "budget"), key=lambda r: r["target_bits"])
    if not recs:
        return ["_Not run yet: `python examples/make_report.py --sections budget`._"]
    uniform, fixed = _uniform_curve(results), _fixed_r_curve(results)
    lines = [
        "`DQACallback(target_bits=...)` chooses every layer's n (2..8), ratio (0..0.5) and m (1..4) under the",
        "budget (`lightning_dqa/calibration/allocation.py`); the image layer stays at 8 bits and counts against it. Compared at",  # noqa: E501  (a rendered line of docs/RESULTS.md)
        "the same measured bits per value with uniform direct quantization (section 3's curve) and fixed-ratio DQA",
        "(r = 0.4, m = 3 on every layer at n = 3, 4, 5; table 1), both interpolated; blank where outside a curve.",
        "",
        "| target bits | measured bits/value | top-1 % | uniform at equal bits | fixed-r DQA at equal bits |",
        "|---|---|---|---|---|",
    ]

    for r in recs:
        lines.append(
            f"| {r['target_bits']:g} | {r['bits_per_value']:.4f} | {r['accuracy']:.2f} | {_vs(uniform, r, 'accuracy')} "
            f"| {_vs(fixed, r, 'accuracy')} |"
        )
    over = [r for r in recs if r["bits_per_value"] > r["target_bits"]]
    lines += [
        "",
        "Measured bits are counted on the test images with the calibration code books; "
        + (
            "every point is within its budget."
            if not over
            else "above budget: "
            + ", ".join(f"{r['target_bits']:g} -> {r['bits_per_value']:.4f}" for r in over)
            + " (the allocation keeps to the budget on the calibration sample; the test images' errors code longer)."
        ),
        "",
        _meta(results, "budget"),
    ]
    return lines


def _overhead(results: dict[str, Any]) -> list[str]:
    ov = results.get("overhead")
    if not ov:
        return ["_Run `python examples/bench_overhead.py` to add this section._"]
    lines = ["| step | ms per batch | x FP32 forward |", "|---|---|---|"]
    for row in ov["rows"]:
        lines.append(f"| {row['step']} | {row['ms']:.1f} | {row['ratio']:.2f} |")
    lines += [
        "",
        f"Command: `{ov['command']}`; {ov['machine']}; batch {ov['batch']}. The forward rows are fake quantization",
        "(what PTQ evaluation and fine-tuning run). The store / restore rows write and read every quantized layer's",
        "input of the batch as codec blobs (`quantizer_to_bytes` / `bytes_to_values`: codes, shift, bit-packing and",
        "entropy coding with the named coder, and back), through the fused byte path (C++ kernels when a compiler",
        "is present); the `C++` and `numpy/torch` rows time the two implementations of that path side by side.",
        "Calibration and ranking times per run are in the JSON records (`calib_seconds`).",
    ]
    return lines


def _qat(results: dict[str, Any]) -> list[str]:
    recs = _records(results, "qat")
    if not recs:
        return ["_Not run yet._"]
    r = recs[0]
    return [
        f"3-bit DQA (r = {r['ratio']}, m = {r['extra_bits']}, learnable scales) fine-tuned with the callback for "
        f"{r['qat_steps']} SGD steps of batch {r['qat_batch_size']} (lr {r['qat_lr']}"
        f"{', BatchNorm statistics frozen' if r.get('qat_freeze_bn_stats') else ''}, "
        f"{r['train_seconds'] / 60:.1f} min on this machine): **{r['accuracy']:.2f} %** top-1 at "
        f"{r['bits_per_value']:.3f} measured bits per value.",
        "",
        _meta(results, "qat"),
    ]


MOBILENETV2_3BIT = {"fp32": 91.42, "direct": 82.75, "noisyquant": 87.67, "dqa": 88.63}  # extended paper


def _network(section: dict[str, Any], png: Path | None = None) -> list[str]:
    """One network of section 6: PTQ table (both settings), greedy against fisher, fine-tuning, budget front."""
    ptq = section.get("ptq", {}).get("records", [])
    seg = any("miou" in r for r in ptq)
    score = "miou" if seg else "accuracy"
    unit = "mIoU %" if seg else "top-1 %"
    lines = [f"### {section['title']}", ""]
    if not ptq:
        return [*lines, "_Not run yet._", ""]
    fp32 = next(r for r in ptq if r["method"] == "fp32")
    extra = f", pixel accuracy {fp32['accuracy']:.2f} %" if seg else ""
    lines += [
        f"FP32: **{fp32[score]:.2f}** {unit}{extra}, {fp32['activation_kib_per_image']:.1f} KiB of quantized-point "
        f"activations per image; evaluated on {fp32['test_images']} images, calibrated on {fp32['calib_samples']} "
        "seeded-random training images.",
        "",
    ]
    ref = "" if seg else " paper drop (3-bit) |"
    lines += [
        f"| setting | method | bits | {unit} | drop vs FP32 | measured bits/value | per-tensor saving |{ref}",
        "|---|---|---|---|---|---|---|" + ("" if seg else "---|"),
    ]
    for r in ptq:
        if r["method"] == "fp32" or r.get("experiment"):
            continue
        paper = ""
        if not seg:
            drop = MOBILENETV2_3BIT["fp32"] - MOBILENETV2_3BIT[r["method"]]
            paper = f" {drop:.2f} |" if r["bits"] == 3 else " |"
        lines.append(
            f"| {r['setting']} | {METHOD_NAMES[r['method']]} | {r['bits']} | {r[score]:.2f} | "
            f"{fp32[score] - r[score]:.2f} | {r['bits_per_value']:.3f} | {100 * _per_tensor_saving(r):.1f} % |{paper}"
        )
    for setting in ("paper", "default"):
        at3 = {
            r["method"]: r[score] for r in ptq if r["setting"] == setting and r["bits"] == 3 and not r.get("experiment")
        }
        if {"direct", "noisyquant", "dqa"} <= at3.keys():
            lines.append(
                f"- {setting} setting, 3 bits: DQA - direct = {at3['dqa'] - at3['direct']:+.2f}, DQA - NoisyQuant = "
                f"{at3['dqa'] - at3['noisyquant']:+.2f} points."
            )
    if not seg:
        ref = MOBILENETV2_3BIT
        lines.append(
            f"- Extended paper, 3 bits (MobileNetV2 width 1.0, FP32 {ref['fp32']}): direct {ref['direct']}, NoisyQuant "
            f"{ref['noisyquant']}, DQA {ref['dqa']} %. Drops from FP32 are what compare across training recipes."
        )
        lines.append(
            "- Why the paper setting's 3-bit drop is much larger here (docs/MOBILENETV2.md, from "
            "`examples/diagnose_layers.py`): its per-channel maxima over the whole evaluation batch, unclipped, put a "
            "third to three quarters of every layer's values at code 0; MSE-clipped static scales recover most of the "
            "drop (the default setting's rows); the signed grid on ReLU6 outputs is not the cause, since the paper "
            "quantizes conv outputs before BatchNorm, which are about half negative."
        )
    lines += ["", _meta(section, "ptq"), ""]
    same = [r for r in ptq if r.get("experiment") == "ranking_greedy_calib"]
    if same:
        objective = same[-1].get("greedy_objective", "accuracy")
        lines += [
            f"Ranking on the same {same[0]['calib_samples']} calibration images (3-bit DQA, default setting; greedy "
            f"objective: {'minus the summed cross-entropy' if objective == 'loss' else 'correct predictions'}):",
            "",
            f"| ranking | {unit} | calibration + ranking s |",
            "|---|---|---|",
            *(f"| {r['ranking']} | {r[score]:.2f} | {r['calib_seconds']:.1f} |" for r in same),
            "",
        ]
    for r in section.get("qat", {}).get("records", []):
        lines += [
            f"Fine-tuned: 3-bit DQA (learnable scales) for {r['qat_steps']} steps of batch {r['qat_batch_size']} at "
            f"lr {r['qat_lr']}{', BatchNorm statistics frozen' if r.get('qat_freeze_bn_stats') else ''} "
            f"({r['train_seconds'] / 60:.1f} min): **{r[score]:.2f}** {unit}, a drop of "
            f"{fp32[score] - r[score]:.2f} from FP32, at {r['bits_per_value']:.3f} bits per value.",
            "",
            _meta(section, "qat"),
            "",
        ]
    return lines + _network_budget(section, ptq, score, unit, png)


def _network_budget(
    section: dict[str, Any], ptq: list[dict[str, Any]], score: str, unit: str, png: Path | None = None
) -> list[str]:
    """Budget points against the default setting's direct and fixed-ratio DQA rows at equal measured bits.

    With ``png``, also the plot of the three curves against measured bits per value (FP32 as a line).
    """
    recs = sorted(section.get("budget", {}).get("records", []), key=lambda r: r["target_bits"])
    if not recs:
        return []

    def curve(method: str) -> list[tuple[float, float]]:
        rows = [r for r in ptq if r["method"] == method and r["setting"] == "default" and not r.get("experiment")]
        return sorted((r["bits_per_value"], r[score]) for r in rows)

    direct, fixed = curve("direct"), curve("dqa")
    lines = [
        "Under a memory budget (`target_bits`, per-layer n, r, m; default setting), against the default setting's",
        "direct and fixed-ratio DQA rows (3, 4, 5 bits) interpolated at the same measured bits; blank outside them:",
        "",
        f"| target bits | measured bits/value | {unit} | direct at equal bits | fixed-r DQA at equal bits |",
        "|---|---|---|---|---|",
        *(
            f"| {r['target_bits']:g} | {r['bits_per_value']:.4f} | {r[score]:.2f} | {_vs(direct, r, score)} "
            f"| {_vs(fixed, r, score)} |"
            for r in recs
        ),
        "",
    ]
    over = [r for r in recs if r["bits_per_value"] > r["target_bits"]]
    if over:
        lines += [
            "Above budget on the evaluation images (the allocation keeps to it on the calibration sample; these "
            "images' shifting errors code longer with the calibration code books): "
            + ", ".join(f"{r['target_bits']:g} -> {r['bits_per_value']:.4f}" for r in over)
            + ".",
            "",
        ]
    note = section["budget"].get("note")  # e.g. why these records are older than the code (kept in the JSON)
    lines += [*([f"**Note:** {note}", ""] if note else []), _meta(section, "budget"), ""]
    fp32 = next((r[score] for r in ptq if r["method"] == "fp32"), None)
    if png is not None and _plot_front(png, section["title"], unit, direct, fixed, recs, score, fp32):
        lines += [f"![budget front]({png.relative_to(png.parents[1]).as_posix()})", ""]
    return lines


def _plot_front(
    png: Path,
    title: str,
    unit: str,
    direct: list[tuple[float, float]],
    fixed: list[tuple[float, float]],
    budget: list[dict[str, Any]],
    score: str,
    fp32: float | None,
) -> bool:
    """Uniform direct, fixed-ratio DQA and budget points against measured bits, saved to ``png``.

    Returns False, drawing nothing, without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(*zip(*direct, strict=True), "o-", label="uniform n-bit (direct), n = 3, 4, 5")
    ax.plot(*zip(*fixed, strict=True), "D-", color="C3", label="DQA, r = 0.4, m = 3, n = 3, 4, 5")
    ax.plot(
        [r["bits_per_value"] for r in budget], [r[score] for r in budget], "s-", color="C2", zorder=4,
        label="DQA, per-layer widths under target_bits",
    )  # fmt: skip
    if fp32 is not None:
        ax.axhline(fp32, color="gray", ls="--", lw=0.8, label=f"FP32 {fp32:.2f}")
    ax.set_xlabel("measured bits per activation value")
    ax.set_ylabel(unit)
    ax.set_title(f"{title}: accuracy against measured activation memory", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def _networks(results: dict[str, Any], out_dir: Path | None = None) -> list[str]:
    nets = results.get("networks", {})
    if not nets:
        return ["_Not run yet._"]
    lines = [
        "Trained here from scratch with `lightning-dqa fit` (configs and checkpoints:",
        "`examples/checkpoints/README.md`), then quantized exactly like ResNet-32 (same settings, r = 0.4, m = 3,",
        "fisher ranking).",
        "`python examples/report_networks.py` regenerates these tables.",
        "",
    ]
    for name in sorted(nets):
        png = None if out_dir is None else out_dir / f"tradeoff_{name}.png"
        lines += _network(nets[name], png)
    return lines


def render(results: dict[str, Any], png: Path) -> str:
    """The whole RESULTS.md text."""
    parts = [
        "# Results: ResNet-32 on CIFAR-10",
        "",
        "Every number here was produced by the code in this repository, by the command shown under its table;",
        "`python examples/make_report.py --render-only` rebuilds this page from `docs/results/resnet32_cifar10.json`.",
        "Accuracy is top-1 on the CIFAR-10 test set (10,000 images unless a row says otherwise); calibration uses",
        "5,000 seeded-random training images (greedy: 1,000). Post-training quantization of activations only",
        "(weights FP32), through `Trainer(callbacks=[DQACallback(...)]).validate(...)`.",
        "",
        "Settings. *Paper*: dynamic per-channel maxima, signed codes, no clipping, every Conv2d/Linear **output**",
        "quantized (first and last layer included), r = 0.4, m = 3. *Default* (this project): every Conv2d/Linear",
        "**input** (what a deployment stores between layers), static per-channel scales with MSE clipping,",
        "unsigned codes for non-negative tensors, the first layer's input (the image) at 8 bits, r = 0.4, m = 3,",
        "fisher ranking. In both, the residual shortcut of a block reads the block input in full precision (the",
        "paper's and the reproduction's simplification too); memory figures count the quantized tensors only.",
        "",
        "Measured bits per value = n-bit main codes + Huffman-coded shifting errors + per-sample side information",
        "(dynamic scales, 32 bits per channel; the code book), divided by the number of stored values",
        "(`lightning_dqa/deploy/accounting.py`). Static scales are model constants stored once with the weights.",
        "",
        "## 1. The paper's table (3, 4, 5 bits)",
        "",
        *_table1(results),
        "",
        "### Targets",
        "",
        *_targets(results),
        "",
        "## 2. Channel-selection ablation (3 bits, default setting)",
        "",
        *_ablation(results),
        "",
        "## 3. Accuracy against measured memory",
        "",
        *_tradeoff(results, png),
        "",
        "### 3b. A memory budget: per-layer widths under `target_bits`",
        "",
        *_budget(results),
        "",
        "### 3c. Which objective allocates the budget: the module's loss or the label-free output divergence",
        "",
        *objective_section(results.get("objective_fronts")),
        "",
        "## 4. Overhead",
        "",
        *_overhead(results),
        "",
        "## 5. Quantization-aware fine-tuning",
        "",
        *_qat(results),
        "",
        "## 6. The paper's other networks: MobileNetV2 (CIFAR-10) and U-Net (CamVid)",
        "",
        *_networks(results, png.parent),
        "",
        "## 7. Whole-network activation memory, measured from the bytes",
        "",
        *memory_section(results.get("memory"), results.get("peak_table")),
        "",
        "### 7b. Shared values as codes: `shared_values=\"codes\"` or `\"int8\"` (opt-in)",
        "",
        *shared_section(results.get("shared_values")),
        "",
        "### 7c. The banded runtime: `run_banded`",
        "",
        *banded_section(results.get("peak_banded"), results.get("skip_ranking")),
        "",
        "### 7d. The width of the residual stream and skips: `shared_values=\"uniform\"`",
        "",
        *width_section(results.get("shared_width"), results.get("peak_banded")),
        "",
    ]
    return "\n".join(parts)
