"""Every invalid DQACallback argument is refused at construction with a ValueError naming it and its value."""

from __future__ import annotations

import math

import pytest

from lightning_dqa import DQACallback

INVALID: list[tuple[str, object]] = [
    ("bits", 0),
    ("bits", 9),
    ("bits", 3.0),
    ("bits", True),
    ("bits", "4"),
    ("extra_bits", 0),
    ("extra_bits", 15),
    ("extra_bits", 2.5),
    ("ratio", -0.1),
    ("ratio", 1.5),
    ("ratio", math.nan),
    ("ratio", "0.4"),
    ("ratio", True),
    ("method", "dq"),
    ("method", None),
    ("ranking", "gready"),
    ("ranking", ""),
    ("scale_mode", "auto"),
    ("code", "both"),
    ("clipping", "minmax"),
    ("percentile", 0),
    ("percentile", 100.5),
    ("percentile", math.inf),
    ("where", "inside"),
    ("layer_types", "Conv2d"),
    ("layer_types", ["Conv4d"]),
    ("layer_types", []),
    ("include", "conv"),
    ("include", ["("]),
    ("exclude", "fc"),
    ("exclude", [3]),
    ("first_layer_bits", 1),
    ("first_layer_bits", 9),
    ("first_layer_bits", 0.0),
    ("last_layer_bits", -1),
    ("last_layer_bits", "8"),
    ("seed", 1.5),
    ("seed", None),
    ("calibration_samples", 0),
    ("calibration_samples", 10.0),
    ("calibration_source", "test"),
    ("delay_steps", -1),
    ("delay_steps", 1.0),
    ("greedy_objective", "f1"),
    ("ignore_index", 1.5),
    ("ignore_index", None),
    ("measure_memory", "yes"),
    ("log_per_layer", 1),
    ("fp32_baseline", None),
    ("verbose", "false"),
    ("check_finite", 0),
    ("export_path", ""),
    ("export_path", 42),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_argument_is_named_with_its_value(name, value):
    with pytest.raises(ValueError) as info:
        DQACallback(**{name: value})
    message = str(info.value)
    assert name in message, message
    shown = [value, *value] if isinstance(value, list) else [value]  # a list may be named by its bad entry
    assert any(repr(v) in message or str(v) in message for v in shown), message


def test_combined_widths_name_the_rule():
    with pytest.raises(ValueError, match=r"first_layer_bits \+ extra_bits <= 16, got 8 \+ 9 = 17"):
        DQACallback(bits=3, extra_bits=9)
    with pytest.raises(ValueError, match=r"clipping='none' with scale_mode='dynamic'"):
        DQACallback(scale_mode="dynamic", clipping="mse")
