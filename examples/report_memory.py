"""docs/RESULTS.md section 7: whole-network peak activation memory from measured bytes, and the byte path's cost.

Renders the JSON that ``python examples/memory_report.py --out docs/results/memory_networks.json`` writes (imported by
``report_render.py``).
"""

from __future__ import annotations

from typing import Any

CONFIGS = [f"{m} {b}" for b in (3, 4, 5) for m in ("direct", "dqa")]


def _peaks(nets: list[dict[str, Any]]) -> list[str]:
    head = "| network | FP32 | uniform 8-bit | " + " | ".join(c.replace("dqa", "DQA") for c in CONFIGS) + " |"
    lines = [head, "|---" * (3 + len(CONFIGS)) + "|"]
    for net in nets:
        cells = [f"{net['peaks'][c]['stored']:.1f}" for c in CONFIGS]
        shape = "x".join(str(s) for s in net["shape"])
        lines.append(
            f"| {net['network']} {shape} | {net['fp32']:.1f} | {net['int8']:.1f} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Blob bits per value of the same runs (`8 * sum(blob bytes) / values`, headers included):", ""]
    lines += [
        "| network | " + " | ".join(c.replace("dqa", "DQA") for c in CONFIGS) + " |",
        "|---" * (1 + len(CONFIGS)) + "|",
    ]
    for net in nets:
        lines.append(
            f"| {net['network']} | " + " | ".join(f"{net['peaks'][c]['bits_per_value']:.3f}" for c in CONFIGS) + " |"
        )
    lines.append("")
    for net in nets:
        live = ", ".join(f"{what} {kib:.1f}" for what, kib in net["dqa3_peak_live"])
        lines.append(f"- {net['network']}, DQA 3-bit peak at step `{net['dqa3_peak_step']}`: {live} KiB.")
    return lines


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


def memory_section(mem: dict[str, Any] | None) -> list[str]:
    """The section's Markdown lines (a pointer to the command when the JSON is absent)."""
    if not mem:
        return ["_Run `python examples/memory_report.py --out docs/results/memory_networks.json` to add this section._"]
    nets = mem["networks"]
    return [
        "Peak activation KiB per image of the whole network, with every quantized activation really stored as a",
        "blob (`lightning_dqa.run_compressed`, liveness analysis of the `torch.fx` graph in execution",
        "order; residual shortcuts, concatenated skips and the input stay in full precision). FP32 and uniform 8-bit",
        "are the same pass at 4 and 1 byte per quantized value. Default setting `DQAConfig(bits=n, method=...)`,",
        f"calibrated on {mem['calib']} training images (CamVid: a tenth), mean over {mem['images']} test images run",
        "one at a time; each compressed output was checked bit for bit against the fake-quantized forward.",
        "",
        *_peaks(nets),
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
    ]
