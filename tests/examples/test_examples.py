"""The example scripts: reproduce_paper.py's records (ResNet-32 and the committed MobileNetV2) and the report.

Small runs on real data (50 test images, 32 calibration images); they skip when ``../shared`` lacks it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import reproduce_paper  # noqa: E402
from report_render import render  # noqa: E402

RECORD_KEYS = {
    "arch",
    "method",
    "bits",
    "extra_bits",
    "ratio",
    "ranking",
    "setting",
    "accuracy",
    "bits_per_value",
    "calib_seconds",
    "eval_seconds",
}


def test_reproduce_paper_writes_one_record_per_run(cifar_root: Path, resnet32_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--data-root", str(cifar_root), "--weights", str(resnet32_weights), "--limit-test", "50"]
    argv += ["--calib-samples", "32", "--methods", "fp32", "dqa", "--bits", "3", "4", "--out", str(out)]
    records = reproduce_paper.main(argv)
    assert json.loads(out.read_text()) == records
    assert [(r["method"], r["bits"]) for r in records] == [("fp32", None), ("dqa", 3), ("dqa", 4)]
    for r in records:
        assert RECORD_KEYS <= r.keys()
        assert r["test_images"] == 50 and 0.0 <= r["accuracy"] <= 100.0
    assert 3.0 <= records[1]["bits_per_value"] < records[2]["bits_per_value"] < 8.0


def test_reproduce_paper_takes_the_committed_mobilenet(cifar_root: Path) -> None:
    weights = REPO / "examples" / "checkpoints" / "mobilenetv2_w050_cifar10.pt"
    kwargs = json.dumps({"arch_kwargs": {"width_mult": 0.5, "dropout": 0.0}})
    argv = ["--arch", "mobilenetv2", "--weights", str(weights), "--model-kwargs", kwargs]
    argv += ["--data-root", str(cifar_root), "--limit-test", "50", "--calib-samples", "32", "--methods", "fp32"]
    (record,) = reproduce_paper.main(argv)
    assert record["arch"] == "mobilenetv2" and record["accuracy"] >= 70.0  # 89.03 % on the full test set


def test_results_page_is_what_the_committed_json_renders(tmp_path: Path) -> None:
    """docs/RESULTS.md holds exactly what report_render makes of the committed JSON (no hand edits, no stale page)."""
    pytest.importorskip("matplotlib")
    results_dir = REPO / "docs" / "results"
    results = json.loads((results_dir / "resnet32_cifar10.json").read_text())
    results["overhead"] = json.loads((results_dir / "overhead_resnet32.json").read_text())
    results["networks"] = {
        name: json.loads((results_dir / f"{name}.json").read_text()) for name in ("mobilenetv2_cifar10", "unet_camvid")
    }
    results["memory"] = json.loads((results_dir / "memory_networks.json").read_text())
    results["peak_table"] = json.loads((results_dir / "peak_table.json").read_text())
    results["objective_fronts"] = json.loads((results_dir / "objective_fronts.json").read_text())
    results["shared_values"] = json.loads((results_dir / "shared_values.json").read_text())
    results["peak_banded"] = json.loads((results_dir / "peak_banded.json").read_text())
    results["shared_width"] = json.loads((results_dir / "shared_width.json").read_text())
    results["skip_ranking"] = json.loads((results_dir / "skip_ranking.json").read_text())
    png = tmp_path / "results" / "plot.png"
    png.parent.mkdir()
    text = render(results, png)
    assert png.stat().st_size > 0
    assert "_Not run yet._" not in text
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "### MobileNetV2", "### U-Net", "## 7."):
        assert heading in text
    committed = (REPO / "docs" / "RESULTS.md").read_text()
    assert text.replace("results/plot.png", "results/tradeoff_resnet32.png") == committed
