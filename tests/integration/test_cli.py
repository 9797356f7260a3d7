"""The lightning-dqa command (LightningCLI): YAML configs run, and --print_config round-trips."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from lightning_dqa.integration.cli import run_cli as main

REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  max_epochs: 1
  callbacks:
    - class_path: lightning_dqa.DQACallback
      init_args:
        bits: 3
        ranking: energy
        calibration_samples: 64
model:
  class_path: tiny.TinyNet
  init_args:
    width: 8
data:
  class_path: tiny.TinyData
"""


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.mark.parametrize("subcommand", ["validate", "test", "fit"])
def test_cli_runs_each_subcommand(tiny_config, tmp_path, subcommand):
    cli = main([subcommand, "--config", str(tiny_config), "--trainer.default_root_dir", str(tmp_path)])
    from lightning_dqa.core.attach import quantizers_of

    assert all(bool(q.calibrated) for q in quantizers_of(cli.model).values())
    if subcommand != "fit":
        assert "dqa/bits_per_value" in cli.trainer.callback_metrics


def test_print_config_round_trips(tiny_config, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["validate", "--config", str(tiny_config), "--print_config"])
    printed = yaml.safe_load(out.getvalue())
    cb = printed["trainer"]["callbacks"][0]
    assert cb["class_path"] == "lightning_dqa.DQACallback" and cb["init_args"]["bits"] == 3
    again = tmp_path / "again.yaml"
    again.write_text(out.getvalue())
    out2 = io.StringIO()
    with contextlib.redirect_stdout(out2), pytest.raises(SystemExit):
        main(["validate", "--config", str(again), "--print_config"])
    assert yaml.safe_load(out2.getvalue()) == printed


def test_invalid_callback_argument_in_yaml_names_it(tiny_config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.replace("bits: 3", "bits: 12"))
    with pytest.raises((ValueError, SystemExit)):
        main(["validate", "--config", str(bad)])


@pytest.mark.parametrize("config", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    out = io.StringIO()
    subcommand = "fit" if "qat" in config.name or "train" in config.name else "validate"
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    assert yaml.safe_load(out.getvalue())["model"]["class_path"]


def test_console_entry_point_exits_zero(tiny_config, tmp_path, monkeypatch):
    import sys

    from lightning_dqa.integration.cli import main as console_main

    argv = ["lightning-dqa", "validate", "--config", str(tiny_config), "--trainer.default_root_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    assert console_main() is None  # setuptools wraps it as sys.exit(main()): None means status 0


def test_paper_yaml_is_the_paper_setting():
    """YAML cannot import PAPER_SETTING, so the shipped paper config is checked against it field by field."""
    import dataclasses

    from lightning_dqa import DQAConfig
    from lightning_dqa.core.config import PAPER_SETTING

    config = yaml.safe_load((REPO / "examples" / "configs" / "resnet32_cifar10_paper.yaml").read_text())
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DQACallback")]
    args = callback["init_args"]
    defaults = {f.name: f.default for f in dataclasses.fields(DQAConfig)}
    assert {k: args.get(k, defaults[k]) for k in PAPER_SETTING} == PAPER_SETTING
