"""examples/bench_entropy.py on a small real run: every installed coder round-trips ResNet-32's shifting errors.

Skips when ``../shared`` lacks CIFAR-10 or the ResNet-32 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import bench_entropy  # noqa: E402

from lightning_dqa.codec.entropy import available_coders  # noqa: E402


def test_bench_entropy_runs_every_coder(
    cifar_root: Path, resnet32_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    argv = ["--data-root", str(cifar_root), "--weights", str(resnet32_weights)]
    try:
        rows = bench_entropy.main([*argv, "--batch", "4", "--calib-samples", "32", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [r["coder"] for r in rows] == available_coders()
    for r in rows:
        assert 0 < r["payload_bits"] <= r["stored_bits"] and r["enc"] > 0 and r["dec"] > 0
    assert "cross-entropy under the calibration model" in capsys.readouterr().out
