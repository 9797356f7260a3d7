"""DQAConfig validation: every bad argument fails with a message naming the argument, the rule and the value."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lightning_dqa import DQAConfig, paper_config


def check(match_parts: list[str], **kwargs) -> None:
    with pytest.raises(ValueError) as info:
        DQAConfig(**kwargs)
    msg = str(info.value)
    for part in match_parts:
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.mark.parametrize("value", [0, 1, 9, 1.5, True, "4", None])
def test_bits(value):
    check(["bits", "int in [2, 8]", repr(value)], bits=value)


@pytest.mark.parametrize("value", [0, -1, 15, 2.0, False])
def test_extra_bits(value):
    check(["extra_bits", "int in [1, 14]", repr(value)], extra_bits=value)


@pytest.mark.parametrize(("bits", "extra"), [(8, 9), (5, 12), (3, 14)])
def test_total_bits(bits, extra):
    check(["bits + extra_bits", "<= 16", f"{bits} + {extra} = {bits + extra}"], bits=bits, extra_bits=extra)


def test_total_bits_at_limit_is_fine():
    assert DQAConfig(bits=8, extra_bits=8).extra_bits == 8


@pytest.mark.parametrize("value", [-0.1, 1.1, float("nan"), True, "0.4"])
def test_ratio(value):
    check(["ratio", "[0, 1]", repr(value)], ratio=value)


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("method", "dqaa"),
        ("ranking", "hessian"),
        ("clipping", "kl"),
        ("scale_mode", "adaptive"),
        ("code", "int"),
        ("where", "both"),
    ],
)
def test_unknown_choices(arg, value):
    kwargs = {arg: value}
    if arg == "scale_mode":
        kwargs["clipping"] = "none"
    check([arg, "one of", repr(value)], **kwargs)


def test_choice_message_lists_allowed_values():
    check(["'dqa'", "'direct'", "'noisyquant'", "'fp32'"], method="x")
    check(["'fisher'", "'energy'", "'greedy'"], ranking="x")


@pytest.mark.parametrize("clipping", ["mse", "percentile"])
def test_dynamic_scales_cannot_clip(clipping):
    check(["clipping", "dynamic", repr(clipping), "static"], scale_mode="dynamic", clipping=clipping)


def test_dynamic_without_clipping_is_fine():
    assert DQAConfig(scale_mode="dynamic", clipping="none").scale_mode == "dynamic"


@pytest.mark.parametrize("value", [0, 0.0, -1, 100.5])
def test_percentile(value):
    check(["percentile", "(0, 100]", repr(value)], percentile=value)


def test_layer_types():
    check(["layer_types", "at least one", "[]"], layer_types=())
    check(["layer_types", "list of strings", "'Conv2d'"], layer_types="Conv2d")
    check(["layer_types", "one of", "'Dense'"], layer_types=("Dense",))
    check(["include", "list of strings"], include=(3,))
    check(["exclude", "list of strings"], exclude="fc")


def test_lists_become_tuples():
    cfg = DQAConfig(layer_types=["Conv2d"], include=["a"], exclude=["b"])
    assert cfg.layer_types == ("Conv2d",) and cfg.include == ("a",) and cfg.exclude == ("b",)
    hash(cfg)  # frozen and hashable once lists are tuples


@pytest.mark.parametrize("arg", ["first_layer_bits", "last_layer_bits"])
@pytest.mark.parametrize("value", [1, 9, 2.5, True])
def test_first_last_layer_bits(arg, value):
    check([arg, "int in [2, 8]", repr(value), "0 for full precision"], **{arg: value})


@pytest.mark.parametrize("arg", ["first_layer_bits", "last_layer_bits"])
@pytest.mark.parametrize("value", [None, 0, 2, 8])
def test_first_last_layer_bits_valid(arg, value):
    assert getattr(DQAConfig(**{arg: value}), arg) == value


@pytest.mark.parametrize("value", [1.0, True, "0", None])
def test_seed(value):
    check(["seed", "int", repr(value)], seed=value)


def test_defaults():
    cfg = DQAConfig()
    assert cfg.bits == 4 and cfg.extra_bits == 3 and cfg.ratio == 0.4
    assert (cfg.method, cfg.ranking, cfg.scale_mode, cfg.code, cfg.clipping) == (
        "dqa",
        "fisher",
        "static",
        "auto",
        "mse",
    )
    assert cfg.where == "input" and cfg.layer_types == ("Conv2d", "Linear")
    assert cfg.include == () and cfg.exclude == ()
    assert cfg.first_layer_bits == 8 and cfg.last_layer_bits is None and cfg.seed == 0
    assert cfg.percentile == 99.99
    assert cfg.effective_ratio == 0.4 and cfg.needs_gradients


def test_effective_ratio_and_needs_gradients():
    assert DQAConfig(method="direct").effective_ratio == 0.0
    assert not DQAConfig(method="direct").needs_gradients
    assert not DQAConfig(ratio=0.0).needs_gradients
    assert not DQAConfig(ranking="energy").needs_gradients
    assert DQAConfig(ranking="saliency").needs_gradients


def test_frozen_and_replace_validates():
    cfg = DQAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 3  # type: ignore[misc]
    assert cfg.replace(bits=3).bits == 3 and cfg.bits == 4
    with pytest.raises(ValueError, match="bits"):
        cfg.replace(bits=0)


def test_to_dict_round_trip_through_json():
    cfg = DQAConfig(bits=3, include=("a",), exclude=("b", "c"), last_layer_bits=0)
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(DQAConfig)}
    assert d["layer_types"] == ["Conv2d", "Linear"] and d["exclude"] == ["b", "c"]
    assert DQAConfig(**json.loads(json.dumps(d))) == cfg


def test_paper_config():
    cfg = paper_config(3)
    assert (cfg.bits, cfg.extra_bits, cfg.ratio, cfg.method, cfg.ranking) == (3, 3, 0.4, "dqa", "greedy")
    assert (cfg.scale_mode, cfg.code, cfg.clipping, cfg.where) == ("dynamic", "signed", "none", "output")
    assert cfg.first_layer_bits is None and cfg.last_layer_bits is None
    assert paper_config(5, ranking="energy").ranking == "energy"
    with pytest.raises(ValueError, match="bits"):
        paper_config(1)


@pytest.mark.parametrize("value", [False, 0.0])
def test_first_layer_bits_rejects_bool_and_float_zero(value):
    check(["first_layer_bits", repr(value)], first_layer_bits=value)


@pytest.mark.parametrize("value", ["high", None, True])
def test_percentile_non_numbers(value):
    check(["percentile", repr(value)], percentile=value)


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_invalid_regex_is_rejected_at_construction(arg):
    check([arg, "'('"], **{arg: ("(",)})


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64, True, 1.0])
def test_seed_outside_lightnings_range_is_refused_at_construction(seed):
    with pytest.raises(ValueError, match=r"seed to be an int in \[0, 4294967295\]"):
        DQAConfig(seed=seed)


def test_the_callback_refuses_an_overflowing_seed_when_built():
    from lightning_dqa import DQACallback

    with pytest.raises(ValueError, match="seed"):
        DQACallback(seed=2**64)
    assert DQACallback(seed=2**32 - 1).config.seed == 2**32 - 1
