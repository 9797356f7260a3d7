"""docs/RESULTS.md section 7: whole-network peak activation memory from measured bytes, and the byte path's cost.

Renders the JSON that ``OMP_NUM_THREADS=1 python examples/peak_table.py --out docs/results/peak_table.json`` writes
(the peaks, arena sizes) and the JSON of ``python examples/memory_report.py --out docs/results/memory_networks.json``
(blob bits per value and the byte path's cost); imported by ``report_render.py``.
"""

from __future__ import annotations

from typing import Any

from report_sections import printed

CONFIGS = [f"{m} {b}" for b in (3, 4, 5) for m in ("direct", "dqa")]


def _blob_bits(nets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| network | " + " | ".join(c.replace("dqa", "DQA") for c in CONFIGS) + " |",
        "|---" * (1 + len(CONFIGS)) + "|",
    ]
    for net in nets:
        lines.append(
            f"| {net['network']} | " + " | ".join(f"{net['peaks'][c]['bits_per_value']:.3f}" for c in CONFIGS) + " |"
        )
    return lines


def peak_section(peak: dict[str, Any] | None) -> list[str]:
    """Section 7's peak table, from ``examples/peak_table.py``'s JSON (a pointer to the command when absent)."""
    if not peak:
        return ["_Run `OMP_NUM_THREADS=1 python examples/peak_table.py --out docs/results/peak_table.json`._"]
    nets = peak["networks"]
    tight = sum(abs(n["dqa3"]["all"] - n["dqa3_live_kib"]) < 0.05 for n in nets)
    above = [n["network"].split(",")[0] for n in nets if n["dqa3"]["all"] > n["int8"]["all"]]
    return [
        "Peak activation KiB of one image (batch 1) as `lightning_dqa.run_compressed` runs the network: every",
        "quantized activation stored as its blob, every other tensor (the input, residual shortcuts, concatenated",
        "skips, each convolution's output before it is coded) in float32 and whole. Every live buffer is placed at",
        "an offset in one arena, greedy by size as TFLite Micro's planner does (`lightning_dqa.deploy.arena`), and",
        "the peak is the arena's size. `FP32`: the same pass in float32, layer by layer. `all-int8`: every buffer",
        "of that FP32 pass at one byte per value (TFLite Micro's full-integer plan), planned again. `direct 3`,",
        "`DQA 3`: the default setting `DQAConfig(bits=3, method=...)`. `DQA3 live`: the most KiB live at one step,",
        "the arena's lower bound. The second table leaves the model input's and the final output's buffers out of",
        f"the arena. Calibrated on {peak['calib']} training images (CamVid: a tenth; the torchvision networks have",
        "random weights and read CIFAR-10 images scaled to 96x96), one test image; each compressed output was",
        "checked bit for bit against the fake-quantized forward.",
        "",
        *printed(peak),
        "",
        f"The arena reaches the live bound for DQA 3 on {tight} of the {len(nets)} networks. 3-bit DQA is above",
        f"the all-int8 plan on {len(above)} of the {len(nets)} networks ({', '.join(above) or 'none'}): storing",
        "the quantized activations as codes does not shrink the float32 tensors that make the peak of this",
        "layer-by-layer pass. Coded shortcuts and skips (section 7b) and the banded runtime (section 7c) do.",
        "",
        *_time_aim(nets),
        "",
        "What changed against the previous version of this section: the peaks are arena sizes (they were the most",
        "bytes live at one step, now the `DQA3 live` column); the all-int8 plan (every buffer at one byte)",
        "replaces uniform 8-bit (the quantized activations at one byte, the rest in float32); the 4- and 5-bit",
        "peaks are no longer listed; the torchvision networks, the input and output listed apart and the time of",
        "the compressed pass are new; one test image instead of the mean of four. Since then: the pass is timed",
        "at batch 1 and 8 beside the fake-quantized forward, as `run_compressed` and as a `CompressedRunner`.",
    ]


def _time_aim(nets: list[dict[str, Any]]) -> list[str]:
    """Issue 22's time aim (the compressed pass at most 2x the FP32 forward at batch 1), from the timings."""
    if not all("ms" in n for n in nets):
        return []

    def ratio(n: dict[str, Any], batch: str, key: str = "runner") -> float:
        return n["ms"][batch][key] / n["ms"][batch]["fp32"]

    met = [n["network"].split(",")[0] for n in nets if ratio(n, "1") <= 2.0]
    rest = ", ".join(f"{n['network'].split(',')[0]} {ratio(n, '1'):.1f}x" for n in nets if ratio(n, "1") > 2.0)
    fake = ", ".join(f"{ratio(n, '1', 'fake'):.1f}x" for n in nets)
    return [
        "Time: a `CompressedRunner` (`lightning_dqa.CompressedRunner(model)`: the trace and plan made once, each",
        "call a pass) meets issue 22's aim of at most 2x the FP32 forward at batch 1 on "
        f"{len(met)} of the {len(nets)} networks ({', '.join(met) or 'none'}); not on {rest or 'none'}.",
        "`run_compressed` traces the model at every call. On the small networks each quantized layer costs a",
        "Python step, an encode and a decode beside a convolution that takes a fraction of a millisecond, so the",
        f"overhead stays: even the fake-quantized forward takes {fake} the FP32 forward at batch 1 (in the order",
        "of the table).",
    ]


def _timing(nets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| network | batch | FP32 forward ms | DQA 3 store | DQA 3 restore | DQA 4 store | DQA 4 restore |",
        "|---|---|---|---|---|---|---|",
    ]
    for net in nets:
        t3, t4 = net["timing"]["dqa 3"], net["timing"]["dqa 4"]
        cells = [f"{t[k + '_ms']:.1f} ms ({t[k + '_ratio']:.2f}x)" for t in (t3, t4) for k in ("store", "restore")]
        lines.append(f"| {net['network']} | {net['timing_batch']} | {t3['fp32_ms']:.1f} | " + " | ".join(cells) + " |")
    return lines


def memory_section(mem: dict[str, Any] | None, peak: dict[str, Any] | None = None) -> list[str]:
    """The section's Markdown lines: the peak table, then blob bits and the byte path's cost (pointers if absent)."""
    lines = [*peak_section(peak), ""]
    if not mem:
        return [*lines, "_Run `python examples/memory_report.py --out docs/results/memory_networks.json` for more._"]
    nets = mem["networks"]
    return [
        *lines,
        "Blob bits per value (`8 * sum(blob bytes) / values`, headers included) of the runs of",
        "`examples/memory_report.py` (default setting `DQAConfig(bits=n, method=...)`, calibrated on",
        f"{mem['calib']} training images, CamVid a tenth, mean over {mem['images']} test images run one at a time):",
        "",
        *_blob_bits(nets),
        "",
        "Cost of the byte path on one batch: store (`quantizer_to_bytes` of every quantized activation: quantize,",
        "shift, pack and Huffman-code in one fused pass per layer) and restore (`bytes_to_values`: back to the",
        "fake-quantized values), default setting, minimum of interleaved repeats, against the FP32 forward timed in",
        f"the same rounds. Byte path: {mem['byte_path']}.",
        "",
        *_timing(nets),
        "",
        f"Command: `{mem['command']}`; {mem['machine']}. Timings were taken while another job shared the 2 cores.",
        "Restore writes a fresh float32 tensor per layer; in this long-running process (after the calibrations)",
        "glibc returned freed memory to the OS, so every restore and every FP32 forward paid first-touch page",
        "faults on its output (with `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set high they go away);",
        "`examples/bench_overhead.py`, in a fresh process, gives the store and restore ratios quoted in the README.",
        "That run's peak figures (the most bytes live at one step, at 3, 4 and 5 bits) are in",
        "`docs/results/memory_networks.json`; the table above replaces them.",
    ]
