"""``run_banded``: the row-banded runtime computes what the fake-quantized forward computes, and says what it holds.

Bands change no float sum of a convolution, but a kernel may order a sum by the tensor's shape, and an element-wise
kernel may round its vector body and its scalar tail differently; so on real weights the banded output may differ
from the fake-quantized one in the last bits (``docs/RESULTS.md`` gives the largest difference and the agreement on
the test sets). These tests make every sum exact instead: weights are multiples of 1/2 in [-1, 1], biases zero,
BatchNorm multiplies by 1/4 or 1/2, activations are ReLU-like, every convolution reads quantized values and every
quantizer has one power-of-two scale for all its channels. Every value is then a dyadic number of at most about 20
significant bits, so any order of any sum gives the same bits, on any CPU, and the banded output must equal the
fake-quantized forward bit for bit (up to the sign of zeros), whatever the band height.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_arena import check_disjoint
from torch import Tensor, nn

from lightning_dqa import DQAConfig, calibrate, prepare, run_banded
from lightning_dqa.core.attach import quantizers_of
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.demos.models import build_model
from lightning_dqa.deploy import banded_report
from lightning_dqa.deploy.arena import live_bytes
from lightning_dqa.deploy.banded import BandedBlob, BandedReport
from lightning_dqa.deploy.layer_bytes import quantizer_to_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = ("Conv2d", "ConvTranspose2d", "Linear")  # every convolution reads quantized values
_RELU_LIKE = {nn.Hardswish: nn.ReLU, nn.SiLU: nn.ReLU, nn.Hardsigmoid: nn.ReLU6, nn.Sigmoid: nn.ReLU6}


def tv(name: str) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None)


NETWORKS = {
    "resnet32": (lambda: build_model("resnet32"), (3, 32, 32)),
    "mobilenetv2": (lambda: build_model("mobilenetv2", width_mult=0.5, dropout=0.0), (3, 32, 32)),
    "unet": (lambda: build_model("unet", base_width=8, depth=3), (3, 45, 61)),  # odd sizes: zero-padded skips
    "resnet18": (lambda: tv("resnet18"), (3, 64, 64)),
    "mobilenet_v3_small": (lambda: tv("mobilenet_v3_small"), (3, 64, 64)),
    "efficientnet_b0": (lambda: tv("efficientnet_b0"), (3, 64, 64)),
}


def dyadic(model: nn.Module, g: torch.Generator) -> nn.Module:
    """``model`` with every sum exact in float32 (see the module docstring); activations made ReLU-like."""
    for name, m in list(model.named_modules()):
        for kind, relu in _RELU_LIKE.items():
            if isinstance(m, kind) and name:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, relu())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                m.weight.copy_(torch.randint(-2, 3, m.weight.shape, generator=g) / 2)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0
                m.running_var.fill_(1.0)
                m.running_mean.zero_()
                m.weight.copy_(2.0 ** -torch.randint(1, 3, m.weight.shape, generator=g))
                m.bias.zero_()
    return model


def calibrated(
    name: str, shared_values: str = "codes", batch: int = 1, shared_bits: int = 8
) -> tuple[nn.Module, Tensor]:
    """A calibrated dyadic copy of a network and an input of dyadic values."""
    build, shape = NETWORKS[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = dyadic(build(), g).eval()
    config = DQAConfig(
        bits=3, ranking="energy", shared_values=shared_values, shared_bits=shared_bits, layer_types=LAYERS
    )
    prepare(model, config)
    images = torch.randint(-8, 9, (2, *shape), generator=g) / 8
    calibrate(model, config, [images], forward_fn=lambda m, b: m(b))
    with torch.no_grad():
        for q in quantizers_of(model).values():
            q.set_static_scale(torch.full_like(q.scale, 2.0 ** torch.round(torch.log2(q.scale.max())).item()))
    return model, torch.randint(-8, 9, (batch, *shape), generator=g) / 8


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_banded_output_equals_the_fake_quantized_forward(name: str) -> None:
    model, x = calibrated(name)
    with torch.no_grad():
        reference = model(x) + 0.0
    for band_rows in (1, 3):
        out, report = run_banded(model, x, band_rows=band_rows)
        assert torch.equal(out + 0.0, reference), f"{name}, band_rows={band_rows}"
        assert report.whole == []  # every node of these networks runs in bands
        check_report(report)


def check_report(report: BandedReport) -> None:
    """What every report guarantees: planned arenas, codes smaller than floats, the input and output apart."""
    for scheme in ("stored", "int8", "fp32"):
        plan = report.arena(scheme)
        assert plan.nbytes >= live_bytes(plan.buffers)
        check_disjoint(plan)  # no two buffers live at one step share a byte
    coded = live_bytes(report.arena("stored").buffers)
    assert coded < live_bytes(report.arena("fp32").buffers)
    names = {b.name for b in report.arena("stored", apart=False, in_place=False).buffers} - {
        b.name for b in report.arena("stored", in_place=False).buffers
    }
    assert names == report._inputs | report._outputs
    assert report.input_bytes > 0 and report.output_bytes > 0
    for scheme in ("stored", "int8", "fp32"):
        assert report.arena(scheme).nbytes <= report.arena(scheme, in_place=False).nbytes
        check_in_place(report, scheme)


def check_in_place(report: BandedReport, scheme: str) -> None:
    """Replay every in-place chain byte by byte in its ring: no band is written over a band still to be read.

    Each value starts ``gap`` bytes below its predecessor (mod the ring), bands packed upward in the order
    written. A band of a value is live from its write until the last tick that reads one of its rows (a tick's
    reads come before its write); a band written at a tick must not touch a live band of the value it replaces.
    """
    by_name = {s.name: s for s in report.stored}
    pairs = report.in_place(scheme)
    assert len({p.x for p in pairs}) == len(pairs) == len({p.y for p in pairs})
    for p in pairs:
        x, y = by_name[p.x], by_name[p.y]
        assert x.last == y.first and p.gap >= 0
        ring = max(q.nbytes for q in pairs)  # any ring at least as large as the pair's own works
        x_sizes, y_sizes = x.band_bytes(scheme)[1], y.band_bytes(scheme)[1]
        assert sum(x_sizes) + p.gap <= p.nbytes and sum(y_sizes) <= p.nbytes
        x_start, y_start = p.gap, 0

        def cells(start: int, sizes: list[int], j: int, ring: int = ring) -> set[int]:
            offset = start + sum(sizes[:j])
            return {(offset + k) % ring for k in range(sizes[j])}

        free = [max(x.reads[lo:hi], default=-1) for _, lo, hi in x.writes]
        for j, (tick, _, _) in enumerate(y.writes):
            live = set().union(*(cells(x_start, x_sizes, i) for i in range(len(x_sizes)) if free[i] > tick))
            assert not live & cells(y_start, y_sizes, j), f"{p.y} band {j} overwrites a live band of {p.x}"


def test_every_stored_value_of_a_residual_network_is_codes() -> None:
    """ResNet-32 with coded shortcuts: between the input and the global average, nothing is stored in float32."""
    model, x = calibrated("resnet32")
    _, report = run_banded(model, x)
    floats = {s.why for s in report.stored if s.fp32 is not None}
    assert floats <= {
        "model input",
        "model output",
        "global average (summed over bands)",
        "written by a node run whole",
    }
    assert sum(s.fp32 is None for s in report.stored) == 15  # the stem and 14 blocks; the last feeds the average


def test_shortcuts_left_in_float32_are_stored_whole_and_named() -> None:
    """``shared_values="fp32"``: the shortcut is read in full precision, so it is stored whole in float32."""
    model, x = calibrated("resnet32", shared_values="fp32", batch=2)
    with torch.no_grad():
        reference = model(x) + 0.0
    out, report = run_banded(model, x, band_rows=2)
    assert torch.equal(out + 0.0, reference)
    shortcuts = [s for s in report.stored if s.fp32 is not None and s.why == "read by 2 nodes"]
    assert len(shortcuts) == 15  # every block input: the stem and 14 blocks (the last block feeds the average)


def test_an_operation_without_a_banded_rule_runs_whole_and_is_named() -> None:
    """Bilinear upsampling has no rule: it runs whole on its stored input, and the report says so."""
    g = torch.Generator().manual_seed(0)
    model = dyadic(build_model("unet", base_width=4, depth=2, up_mode="bilinear"), g).eval()
    config = DQAConfig(bits=3, ranking="energy", shared_values="codes", layer_types=LAYERS)
    prepare(model, config)
    x = torch.randint(-8, 9, (1, 3, 20, 24), generator=g) / 8
    calibrate(model, config, [x], forward_fn=lambda m, b: m(b))
    with torch.no_grad():
        for q in quantizers_of(model).values():
            q.set_static_scale(torch.full_like(q.scale, 2.0 ** torch.round(torch.log2(q.scale.max())).item()))
    out, report = run_banded(model, x)
    with torch.no_grad():
        assert torch.equal(out + 0.0, model(x) + 0.0)
    assert [(w.op, w.why) for w in report.whole] == [("interpolate", "interpolate has no banded rule")] * 2
    assert "whole: " in report.table() and "interpolate has no banded rule" in report.table()
    assert any(s.why == "written by a node run whole" for s in report.stored)
    with pytest.raises(ValueError, match=r"strict=True.*interpolate \(interpolate\): interpolate has no banded rule"):
        run_banded(model, x, strict=True)


def quantizer(channels: int = 6) -> ActivationQuantizer:
    q = ActivationQuantizer(channels, bits=3, extra_bits=2, scale_mode="static", signed=False, name="conv")
    q.set_static_scale(torch.linspace(0.2, 1.0, channels))
    q.important[::2] = True
    q.error_counts.copy_(torch.tensor([5, 3, 2, 1]))
    q.calibrated.fill_(True)
    return q


def test_banded_blob_is_written_and_read_band_by_band() -> None:
    q = quantizer()
    x = torch.rand(2, 6, 7, 5, generator=torch.Generator().manual_seed(0)) * 3
    blob = BandedBlob(q, tuple(x.shape))
    for lo in range(0, 7, 3):
        blob.write(lo, x[:, :, lo : lo + 3])
    assert blob.starts == [0, 3, 6] and blob.numel == x.numel()
    whole = [quantizer_to_bytes(q, x[:, :, lo : lo + 3]) for lo in (0, 3, 6)]
    assert [blob.blob(i) for i in range(3)] == whole  # each band's blob, byte for byte
    assert blob.nbytes == len(blob.head) + sum(map(len, blob.records)) < sum(map(len, whole))  # one head only
    want = q(x)
    for lo, hi in ((0, 7), (2, 4), (3, 6), (6, 7)):
        values, start = blob.read(lo, hi)
        assert start <= lo and start + values.shape[2] >= hi
        assert torch.equal(values, want[:, :, start : start + values.shape[2]])
    with pytest.raises(ValueError, match="rows 5 to 8 are not stored"):
        blob.read(5, 8)
    other = BandedBlob(q, tuple(x.shape))
    with pytest.raises(ValueError, match="must start at row 0, got rows 3 to 5"):
        other.write(3, x[:, :, 3:5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"band_rows": 0}, "band_rows to be an int >= 1, got 0"),
        ({"band_rows": True}, "band_rows to be an int >= 1, got True"),
        ({"depthwise_chunks": 0}, "depthwise_chunks to be an int >= 1, got 0"),
        ({"depthwise_chunks": 2.0}, "depthwise_chunks to be an int >= 1, got 2.0"),
        ({"inputs": torch.zeros(3, 32, 32)}, r"images \(N, C, H, W\), got a tensor of shape \(3, 32, 32\)"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    model, x = calibrated("resnet32")
    with pytest.raises(ValueError, match=match):
        run_banded(model, **{"inputs": x, **kwargs})


def test_a_band_with_another_head_is_refused() -> None:
    """Bands of one tensor share their head; a blob of another layer configuration does not fit."""
    q, other = quantizer(), quantizer()
    other.important[:] = False
    x = torch.rand(1, 6, 4, 5)
    blob = BandedBlob(q, tuple(x.shape))
    blob.write(0, x[:, :, :2])
    blob.q = other
    with pytest.raises(ValueError, match="differs from the tensor's first band"):
        blob.write(2, x[:, :, 2:])


def test_dynamic_scales_are_refused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    config = DQAConfig(bits=3, ranking="energy", scale_mode="dynamic", clipping="none", first_layer_bits=None)
    prepare(net, config)
    x = torch.rand(1, 3, 8, 8)
    calibrate(net, config, [x], forward_fn=lambda m, b: m(b))
    with pytest.raises(ValueError, match=r"frozen scales.*dynamic ones: \['0', '2'\]"):
        run_banded(net, x)


def test_training_mode_is_refused() -> None:
    model, x = calibrated("resnet32")
    with pytest.raises(ValueError, match="eval mode"):
        run_banded(model.train(), x)


def _calibrate_resnet(**changes: object) -> tuple[nn.Module, Tensor, object]:
    """ResNet-20 at 16x16, 3-bit under a 4-bit budget with coded shortcuts; the calibration report."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    config = DQAConfig(bits=3, target_bits=4.0, shared_values="codes", peak_runtime="banded", **changes)
    prepare(model, config)
    report = calibrate(
        model, config, [(x, y)], example_input=x, forward_fn=lambda m, b: m(b[0]),
        loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
    )  # fmt: skip
    return model, x, report


def test_peak_limit_bounds_the_banded_arena() -> None:
    """``target_peak_bytes`` with ``peak_runtime="banded"`` limits run_banded's arena, not the layer-by-layer peak.

    A limit below what can be reached is refused with the floor; any limit between the floor and the free peak
    is then met.
    """
    model, x, _ = _calibrate_resnet()
    _, free = run_banded(model, x[:1])
    assert free.live_layers and set(free.live_layers) <= set(quantizers_of(model))
    refused = r"Expected target_peak_bytes >= \d+ bytes.*banded runtime's peak.*got 1000"
    with pytest.raises(ValueError, match=refused) as err:
        _calibrate_resnet(target_peak_bytes=1000)
    floor = int(str(err.value).split(">= ")[1].split(" ")[0])
    assert floor < free.peak
    limit = (floor + free.peak) / 2
    model, x, report = _calibrate_resnet(target_peak_bytes=limit)
    _, limited = run_banded(model, x[:1])
    assert limited.peak <= limit < free.peak
    assert report.allocation.peak_bytes == limited.peak
    assert report.allocation.achieved_bits <= report.allocation.limit_bits


def test_block_outputs_are_written_over_their_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResNet-32: each block's output goes into the bands of its input its step has read for the last time.

    The stored values of a stage form one ring, so the arena falls; the byte-by-byte replay of ``check_in_place``
    fails when the gap is understated (it does not pass vacuously).
    """
    model, x = calibrated("resnet32")
    _, report = run_banded(model, x)
    pairs = report.in_place()
    assert len(pairs) >= 14 and any(p.gap > 0 for p in pairs)
    assert report.arena("stored").nbytes < report.arena("stored", in_place=False).nbytes
    check_in_place(report, "stored")
    monkeypatch.setattr(banded_report, "_gap", lambda x, y, scheme: 0)
    with pytest.raises(AssertionError, match="overwrites a live band"):
        check_in_place(report, "stored")


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet_b0"])
def test_depthwise_line_buffers_are_read_chunk_by_chunk(name: str) -> None:
    """An inverted residual's expanded tensor is read by its depthwise convolution one channel chunk at a time.

    The output is the fake-quantized forward's either way; the scratch falls, since the line buffer's rows are
    never all decoded to float32 at once.
    """
    model, x = calibrated(name)
    with torch.no_grad():
        reference = model(x) + 0.0
    peaks = {}
    for chunks in (1, 4):
        out, report = run_banded(model, x, depthwise_chunks=chunks)
        assert torch.equal(out + 0.0, reference), chunks
        peaks[chunks] = max(report.scratch["stored"])
    assert peaks[4] < peaks[1]


def test_a_channel_slice_quantizer_codes_its_channels_as_the_layer_does() -> None:
    from lightning_dqa.core.shared import channel_quantizer
    from lightning_dqa.deploy.compressed import decode

    g = torch.Generator().manual_seed(0)
    q = ActivationQuantizer(8, bits=3, extra_bits=2, scale_mode="static")
    q.set_static_scale(torch.rand(8, generator=g) + 0.1)
    q.important[[1, 5]] = True
    q.calibrated.fill_(True)
    x = torch.randn(2, 8, 3, 5, generator=g)
    part = channel_quantizer(q, 2, 6)
    assert torch.equal(part.quantize_values(x[:, 2:6]), q.quantize_values(x)[:, 2:6])
    assert torch.equal(decode(part, quantizer_to_bytes(part, x[:, 2:6])), q.quantize_values(x)[:, 2:6])


@pytest.mark.parametrize("name", ["resnet32", "unet"])
def test_uniform_shared_values_run_banded_bit_for_bit(name: str) -> None:
    """``shared_values="uniform", shared_bits=4``: shortcuts and skips as 4-bit blobs, the output unchanged."""
    model, x = calibrated(name, shared_values="uniform", shared_bits=4)
    with torch.no_grad():
        reference = model(x) + 0.0
    out, report = run_banded(model, x)
    assert torch.equal(out + 0.0, reference)
    wide = [b for s in report.stored for b in s.blobs.values() if b.q.name.endswith("(4-bit shared)")]
    assert wide and all(b.q.n == 4 for b in wide)
    check_report(report)


def test_a_convolution_of_a_concatenation_runs_one_part_at_a_time() -> None:
    """A U-Net decoder convolution reads its upsampled input and its skip as two convolutions, summed.

    On the dyadic U-Net every sum is exact, so the output is still the fake-quantized forward's; the scratch of
    the decoder falls, since no concatenated band is made and each part's rows are dropped before the next's.
    """
    model, x = calibrated("unet")
    with torch.no_grad():
        reference = model(x) + 0.0
    scratch, peak = {}, {}
    for split in (False, True):
        out, report = run_banded(model, x, split_concat=split)
        assert torch.equal(out + 0.0, reference), split
        check_report(report)
        assert {layer for s in report.stored for layer in s.layers} <= set(quantizers_of(model))  # model layers
        scratch[split], peak[split] = max(report.scratch["stored"]), report.peak
    assert scratch[True] < scratch[False] and peak[True] <= peak[False]


def test_split_concat_rewrites_only_quantized_convolutions_of_a_channel_concatenation() -> None:
    from lightning_dqa.deploy.compressed import _active_quantizers, _trace
    from lightning_dqa.deploy.split_concat import split_concat_convs

    model, x = calibrated("unet")
    quantizers = _active_quantizers(model)
    gm, readers, _, _ = _trace(model, quantizers, "test")
    shapes = {}

    class Shapes(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            value = super().run_node(n)
            shapes[n] = tuple(value.shape) if isinstance(value, Tensor) else ()
            return value

    with torch.no_grad():
        Shapes(gm).run(x)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    readers, quantizers = dict(readers), dict(quantizers)
    split = split_concat_convs(gm, readers, quantizers, shapes)
    assert len(split) == 2 * len(cats) > 0  # two parts per decoder convolution: upsampled input and skip
    assert not [n for n in gm.graph.nodes if n.target is torch.cat]
    for part, layer in split.items():
        assert part.startswith(layer + "[") and quantizers[part].num_channels < quantizers[layer].num_channels
    with torch.no_grad():
        assert torch.equal(gm(x) + 0.0, model(x) + 0.0)  # dyadic: the parts' sums are exact
    assert all(isinstance(m, ActivationQuantizer) for m in quantizers_of(model).values())  # the model is untouched
    assert not any("dqa_split" in name for name, _ in model.named_modules())


def test_a_module_that_returns_a_tuple_runs_whole_for_the_output_read() -> None:
    """Attention returns ``(output, weights)``: the banded runtime runs it whole for the item read, and the
    operations after it that cannot run in bands are named in the report (they used to stop the pass)."""

    class ConvAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.stem(x))
            n, c, rows, cols = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            mixed, _ = self.attention(tokens, tokens, tokens)
            return self.head(mixed.transpose(1, 2).reshape(n, c, rows, cols))

    torch.manual_seed(0)
    model = ConvAttention().eval()
    config = DQAConfig(bits=3, ranking="energy", first_layer_bits=None, exclude=(r"^attention\.out_proj$",))
    prepare(model, config)
    calibrate(model, config, [torch.randn(2, 3, 6, 5)], forward_fn=lambda m, b: m(b))
    x = torch.randn(1, 3, 6, 5)
    out, report = run_banded(model, x)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)
    assert report.whole and all(w.why for w in report.whole)
    assert not any("dqa_output" in name for name, _ in model.named_modules())  # the model itself is untouched
