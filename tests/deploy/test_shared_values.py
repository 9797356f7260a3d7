"""``shared_values="codes"`` / ``"int8"``: a value a quantized layer and others read is coded once, at its producer.

Guarantees held here: the compressed pass equals the fake-quantized forward bit for bit; the shared value is
stored as its reading layer's blob only (no float copy of it is live after the step that produces it); the
arena is smaller than with ``shared_values="fp32"`` where the network has shared values; values no module
returns are named, not skipped; the default leaves everything as it was.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.core.attach import detach_quantizers, quantizers_of
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.core.shared import (
    SHARED_ATTR,
    leading_quantize,
    leading_quantizer,
    shared_hook,
    shared_values_of,
)
from lightning_dqa.demos.models import build_model
from lightning_dqa.deploy.compressed import CompressedReport, run_compressed
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

NETWORKS = {
    "resnet32": (lambda: build_model("resnet32"), (2, 3, 32, 32)),
    "mobilenetv2": (lambda: build_model("mobilenetv2", width_mult=0.5, dropout=0.0), (2, 3, 32, 32)),
    "unet": (lambda: build_model("unet", base_width=4, depth=2), (2, 3, 24, 32)),
}


def compressed(name: str, mode: str) -> tuple[nn.Module, Tensor, Tensor, CompressedReport]:
    """A calibrated random-init demo network, one image, its compressed output and report."""
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = build().eval()
    width = {"shared_values": "uniform", "shared_bits": int(mode[7:])} if mode.startswith("uniform") else {}
    config = DQAConfig(bits=3, ranking="energy", **{"shared_values": mode, **width})
    prepare(model, config)
    g = torch.Generator().manual_seed(0)
    calibrate(model, config, [torch.randn(*shape, generator=g)], forward_fn=lambda m, b: m(b))
    x = torch.randn(1, *shape[1:], generator=g)
    out, report = run_compressed(model, x)
    return model, x, out, report


@pytest.mark.parametrize("mode", ["codes", "int8", "uniform4"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_compressed_equals_fake_quantized_and_stores_no_float_copy(name: str, mode: str) -> None:
    model, x, out, report = compressed(name, mode)
    with torch.no_grad():
        assert torch.equal(out + 0.0, model(x) + 0.0)
    index = {s.name: i for i, s in enumerate(report.steps)}
    for value in report.coded:
        i = index[value]
        assert not any(value in s.reads for s in report.steps[i + 1 :])  # every later reader reads its codes
        assert any(r.value == value and r.blob for s in report.steps[i + 1 :] for r in s.qreads)
        placed = report.stored.arena.placements
        floats = [p.buffer for p in placed if p.buffer.name.endswith(f"{value} (full precision)")]
        assert len(floats) == 1 and floats[0].last == i, floats  # its float buffer ends where it is produced
    assert report.fp_shared == []  # every shared value of the demo networks has a producer module


@pytest.mark.parametrize("mode", ["codes", "int8", "uniform4"])
@pytest.mark.parametrize("name", ["resnet32", "mobilenetv2"])
def test_codes_make_a_smaller_arena(name: str, mode: str) -> None:
    *_, before = compressed(name, "fp32")
    *_, after = compressed(name, mode)
    assert before.coded == [] and len(before.fp_shared) == len(after.coded) > 0
    assert after.stored.nbytes < before.stored.nbytes
    assert after.stored.live_bytes < before.stored.live_bytes


def test_int8_stores_eight_bit_blobs_the_layer_requantizes() -> None:
    """Each shared value is one 8-bit blob of its own; its reading layer writes its narrow codes from it."""
    *_, report = compressed("resnet32", "int8")
    wide = {b.value: b for b in report.blobs if b.layer.endswith("(8-bit shared)")}
    assert sorted(wide) == sorted(report.coded)
    assert all(8 * b.nbytes >= 8 * b.numel for b in wide.values())  # at least a byte per value
    narrow = [b for b in report.blobs if b.value in wide and not b.layer.endswith("(8-bit shared)")]
    assert {b.value for b in narrow} == set(wide) and not any(b.stored for b in narrow)  # made on the fly


@pytest.mark.parametrize("bits", [3, 5])
def test_uniform_codes_are_narrower_blobs_than_int8(bits: int) -> None:
    """``shared_values="uniform"``: each shared value is a ``shared_bits``-bit blob, smaller than the 8-bit one."""
    sizes = {}
    for mode, tag in (("int8", "(8-bit shared)"), (f"uniform{bits}", f"({bits}-bit shared)")):
        *_, report = compressed("resnet32", mode)
        wide = {b.value: b.nbytes for b in report.blobs if b.layer.endswith(tag)}
        assert sorted(wide) == sorted(report.coded)
        sizes[mode] = sum(wide.values())
    assert sizes[f"uniform{bits}"] < sizes["int8"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shared_values": "int8", "shared_bits": 5}, "Expected shared_bits=8 unless shared_values='uniform'"),
        ({"shared_values": "codes", "shared_bits": 4}, "got shared_bits=4 with shared_values='codes'"),
        ({"shared_values": "uniform", "shared_bits": 1}, r"shared_bits to be an int in \[2, 8\], got 1"),
        ({"shared_values": "uniform", "shared_bits": 4.0}, r"shared_bits to be an int in \[2, 8\], got 4.0"),
    ],
)
def test_bad_shared_bits_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DQAConfig(**changes)


def test_unet_skips_are_coded_as_the_leading_channels_of_the_concatenation() -> None:
    """A skip is read by a max-pool and by ``cat([skip, up])``, which a quantized convolution reads: it is coded
    with that convolution's quantizer cut to its first channels, and the max-pool reads the same values."""
    model, _, _, after = compressed("unet", "codes")
    *_, before = compressed("unet", "fp32")
    skips = [v for v in shared_values_of(model) if v.leading]
    assert len(skips) == 2 and {v.value for v in skips} == set(after.coded) == {v.split()[0] for v in before.fp_shared}
    assert after.fp_shared == []
    assert after.stored.live_bytes < before.stored.live_bytes


def test_leading_quantize_is_the_layer_on_the_first_channels() -> None:
    """``q(cat([x, y]))`` on ``x``'s channels equals ``leading_quantize(q, x)``, and its transient quantizer's blob
    decodes to the same values."""
    q = ActivationQuantizer(6, bits=3, extra_bits=2, scale_mode="static", signed=False, name="conv")
    g = torch.Generator().manual_seed(0)
    q.set_static_scale(torch.rand(6, generator=g) + 0.1)
    q.important.copy_(torch.tensor([True, False, False, True, False, True]))
    q.error_counts.copy_(torch.tensor([5, 3, 2, 1]))
    q.calibrated.fill_(True)
    x, y = torch.rand(2, 4, 5, 7, generator=g) * 3, torch.rand(2, 2, 5, 7, generator=g) * 3
    assert torch.equal(leading_quantize(q, x), q(torch.cat([x, y], 1))[:, :4])
    part = leading_quantizer(q, 4)
    assert torch.equal(bytes_to_values(part, quantizer_to_bytes(part, x)), leading_quantize(q, x))


def test_default_installs_nothing() -> None:
    model = build_model("resnet20").eval()
    prepare(model, DQAConfig(bits=3))
    assert shared_values_of(model) == []
    assert not any(SHARED_ATTR in m.__dict__ or shared_hook in m._forward_hooks.values() for m in model.modules())


def test_resnet_producers_are_the_block_outputs() -> None:
    model = build_model("resnet20").eval()
    quantizers = prepare(model, DQAConfig(bits=3, shared_values="codes"))
    values = shared_values_of(model)
    blocks = [f"layer{s}.{b}.relu2" for s in (1, 2, 3) for b in range(3)]
    assert [v.producer for v in values] == ["relu", *blocks[:-1]]  # the stem, then every block but the last
    for v in values:
        assert model.get_submodule(v.producer).__dict__[SHARED_ATTR] is quantizers[v.layer]
        assert v.layer.endswith("conv1")
    detach_quantizers(model)
    assert not any(SHARED_ATTR in m.__dict__ or shared_hook in m._forward_hooks.values() for m in model.modules())


@pytest.mark.parametrize("scale_mode", ["static", "learnable"])
@pytest.mark.parametrize("signed", [True, False])
def test_requantizing_is_exact(scale_mode: str, signed: bool) -> None:
    """``q(q(x)) == q(x)``: the reading layer's pre-hook leaves coded values as they are."""
    g = torch.Generator().manual_seed(1)
    q = ActivationQuantizer(6, bits=3, extra_bits=3, scale_mode=scale_mode, signed=signed)
    q.set_static_scale(torch.rand(6, generator=g) * 3 + 1e-3)
    q.important[::2] = True
    x = torch.randn(4, 6, 5, 5, generator=g) * 4
    with torch.no_grad():
        once = q(x)
        assert torch.equal(q(once), once)
    once = q(x.requires_grad_())  # the straight-through path of fine-tuning
    assert torch.equal(q(once).detach(), once.detach())


class Computed(nn.Module):
    """A shared value computed in ``forward`` (``F.relu``), returned by no module: it must stay in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.last = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = TF.relu(self.stem(x))  # (N, 4, H, W), read by conv and by the add
        g = self.head(self.conv(h) + h)  # returned by the ReLU module, read by last and by the add
        return self.last(g) + g


def test_value_no_module_returns_is_named_and_left_in_float32() -> None:
    model = Computed().eval()
    config = DQAConfig(bits=3, ranking="energy", shared_values="codes")
    with pytest.warns(UserWarning, match=r"leaves 1 shared value\(s\) in full precision: relu \(read by conv: "):
        prepare(model, config)
    g = torch.Generator().manual_seed(0)
    calibrate(model, config, [torch.randn(2, 3, 8, 8, generator=g)], forward_fn=lambda m, b: m(b))
    x = torch.randn(1, 3, 8, 8, generator=g)
    out, report = run_compressed(model, x)
    with torch.no_grad():
        assert torch.equal(out + 0.0, model(x) + 0.0)
    assert report.coded == ["head"]
    assert len(report.fp_shared) == 1 and report.fp_shared[0].startswith("relu (read by conv")


def test_deepcopy_and_pickle_keep_the_producer_on_the_copied_quantizer() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Computed()
        prepare(model, DQAConfig(bits=3, shared_values="codes"))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.head.__dict__[SHARED_ATTR] is quantizers_of(twin)["last"]
        assert shared_hook in twin.head._forward_hooks.values()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"where": "output"}, "Expected where to be 'input' .* with shared_values='codes', got where='output'"),
        ({"scale_mode": "dynamic", "clipping": "none"}, "Expected scale_mode to be 'static' or 'learnable'"),
        ({"method": "noisyquant"}, "Expected method to be not 'noisyquant'"),
        ({"ranking": "greedy", "shared_values": "int8"}, "Expected ranking to be not 'greedy' .* shared_values='int8'"),
        ({"ranking": "greedy"}, "Expected ranking to be not 'greedy'"),
    ],
)
def test_settings_it_cannot_honour_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DQAConfig(**{"shared_values": "codes", **changes})


def test_unknown_value_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Expected shared_values to be one of \[.*'uniform'\], got 'int4'"):
        DQAConfig(shared_values="int4")  # type: ignore[arg-type]


@pytest.mark.parametrize("coded", ["codes", "int8"])
def test_budget_and_peak_limit_run_with_coded_shared_values(coded: str) -> None:
    """``target_bits`` + ``target_peak_bytes`` measure the coded pass: a limit only coding can meet is met."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    peaks = {}
    for mode in ("fp32", coded):
        torch.manual_seed(0)
        model = build_model("resnet20").eval()
        config = DQAConfig(bits=3, target_bits=4.0, shared_values=mode)
        prepare(model, config)
        calibrate(
            model, config, [(x, y)], example_input=x, forward_fn=lambda m, b: m(b[0]),
            loss_fn=lambda m, b: TF.cross_entropy(m(b[0]), b[1]),
        )  # fmt: skip
        peaks[mode] = run_compressed(model, x[:1])[1].stored.nbytes
    assert peaks[coded] < peaks["fp32"]
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    config = DQAConfig(bits=3, target_bits=4.0, target_peak_bytes=peaks["fp32"] - 1, shared_values=coded)
    prepare(model, config)
    calibrate(
        model, config, [(x, y)], example_input=x, forward_fn=lambda m, b: m(b[0]),
        loss_fn=lambda m, b: TF.cross_entropy(m(b[0]), b[1]),
    )  # fmt: skip
    out, report = run_compressed(model, x[:1])
    assert report.stored.nbytes <= peaks["fp32"] - 1
    with torch.no_grad():
        assert torch.equal(out + 0.0, model(x[:1]) + 0.0)


def test_an_artifact_restores_the_shared_width(tmp_path) -> None:
    """``shared_bits`` is a setting, saved with the config: a model restored from the artifact codes its
    shortcuts at the same width and computes the same output."""
    from lightning_dqa import apply_artifact, export_artifact
    from lightning_dqa.core.shared import shared_bits

    model, x, _, _ = compressed("resnet32", "uniform4")
    config = DQAConfig(bits=3, ranking="energy", shared_values="uniform", shared_bits=4)
    export_artifact(model, tmp_path / "dqa.json", config)
    torch.manual_seed(1)
    fresh = NETWORKS["resnet32"][0]().eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "dqa_quantizer" not in k}, strict=False)
    apply_artifact(fresh, tmp_path / "dqa.json")
    readers = {v.layer for v in shared_values_of(fresh) if v.producer is not None}
    assert readers and all(shared_bits(quantizers_of(fresh)[name]) == 4 for name in readers)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
