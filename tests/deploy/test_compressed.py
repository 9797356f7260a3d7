"""Compressed inference: bit-identical to fake quantization, blob bytes as reported, and the liveness rule."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.core.attach import quantizers_of
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.demos.models import build_model
from lightning_dqa.deploy.compressed import CompressedRunner, run_compressed
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes
from lightning_dqa.deploy.liveness import QRead, Step, peak_memory

pytestmark = pytest.mark.usefixtures("single_thread")


def calibrated(model: nn.Module, shape: tuple[int, ...], **cfg) -> tuple[nn.Module, torch.Tensor]:
    """``model`` in eval mode, quantized and calibrated on two random batches; and a fresh batch."""
    config = DQAConfig(**{"bits": 3, "ranking": "energy", **cfg})
    model.eval()
    prepare(model, config)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(*shape, generator=g) for _ in range(2)]
    calibrate(model, config, batches, forward_fn=lambda m, b: m(b))
    return model, torch.randn(*shape, generator=g)


def quantizer_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """The fake-quantized output and what every quantizer read."""
    seen: dict[str, list[torch.Tensor]] = {}
    quantizers = quantizers_of(model)
    hooks = [
        q.register_forward_hook(lambda _m, a, _o, n=n: seen.setdefault(n, []).append(a[0]))
        for n, q in quantizers.items()
    ]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


NETWORKS = {
    "resnet20": (lambda: build_model("resnet20"), (2, 3, 16, 16)),
    "resnet32": (lambda: build_model("resnet32"), (2, 3, 16, 16)),
    "mobilenetv2": (lambda: build_model("mobilenetv2", width_mult=0.5), (2, 3, 16, 16)),
    "unet": (lambda: build_model("unet", base_width=4, depth=2), (2, 3, 16, 12)),
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_compressed_equals_fake_quantization_and_reports_blob_bytes(name: str) -> None:
    torch.manual_seed(0)
    build, shape = NETWORKS[name]
    model, x = calibrated(build(), shape)
    expected, seen = quantizer_inputs(model, x)
    out, report = run_compressed(model, x)
    # Bit for bit, but for the sign of zeros: decoded zero codes are +0.0 where fake quantization may give -0.0.
    assert torch.equal(out + 0.0, expected + 0.0)
    quantizers = quantizers_of(model)
    want = {n: sum(len(quantizer_to_bytes(quantizers[n], t)) for t in xs) for n, xs in seen.items()}
    want = {n: b for n, b in want.items() if not quantizers[n].passthrough}
    assert report.layer_bytes == want
    assert sum(b.nbytes for b in report.blobs) == sum(want.values())
    assert any(b.stored for b in report.blobs)  # some activations really lived as blobs only
    assert report.fp32.nbytes >= report.int8.nbytes >= report.stored.nbytes


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "mobilenetv2"])
def test_peak_ordering_fp32_int8_dqa3(name: str) -> None:
    torch.manual_seed(0)
    build, shape = NETWORKS[name]
    model, x = calibrated(build(), shape)
    _, report = run_compressed(model, x[:1])
    per_image = report.per_image()
    assert per_image["fp32"] > per_image["int8"] > per_image["stored"]


@pytest.mark.parametrize("method", ["direct", "noisyquant"])
def test_other_methods_are_bit_identical(method: str) -> None:
    torch.manual_seed(0)
    model, x = calibrated(build_model("resnet20"), (2, 3, 16, 16), method=method)
    expected, _ = quantizer_inputs(model, x)
    out, report = run_compressed(model, x)
    assert torch.equal(out + 0.0, expected + 0.0)
    assert report.blobs


def test_output_quantization_and_pass_through_layers() -> None:
    torch.manual_seed(0)
    model, x = calibrated(build_model("resnet20"), (2, 3, 16, 16), where="output", first_layer_bits=0)
    expected, _ = quantizer_inputs(model, x)
    out, report = run_compressed(model, x)
    assert torch.equal(out + 0.0, expected + 0.0)
    assert "conv1" not in report.layer_bytes  # pass-through: full precision, no blob
    assert not any(b.stored for b in report.blobs)  # BatchNorm reads each output in full precision next


def test_refusals() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(ValueError, match="with quantizers"):
        run_compressed(model, torch.randn(1, 3, 4, 4))
    prepare(model, DQAConfig(bits=3, ranking="energy"))
    with pytest.raises(ValueError, match="not calibrated"):
        for q in quantizers_of(model).values():
            q.enabled = True
        run_compressed(model, torch.randn(1, 3, 4, 4))
    model, x = calibrated(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)), (2, 3, 4, 4))
    quantizers_of(model)["2"].fp_mask = torch.zeros(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="fp_mask"):
        run_compressed(model, x)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    model, x = calibrated(Branchy(), (2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"torch\.fx"):
        run_compressed(model, x)


# ------------------------------------------------------------------------------------------ liveness
def test_liveness_sequential_by_hand() -> None:
    steps = [
        Step("x", nbytes=12, is_input=True),
        Step("conv1", qreads=(QRead("x", 5, 3),), nbytes=32),
        Step("relu", reads=("conv1",), nbytes=32, elementwise=True),
        Step("conv2", qreads=(QRead("relu", 4, 8),), nbytes=16),
        Step("output", reads=("conv2",)),
    ]
    fp32 = peak_memory(steps)
    assert fp32.per_step == [12, 12 + 32, 32, 32 + 16, 16]  # the ReLU in place; x read by conv1
    assert (fp32.nbytes, fp32.step) == (48, "conv2")
    codes = peak_memory(steps, lambda r: r.nbytes)
    # The input stays in full precision until conv1 reads it; the ReLU's codes live from the ReLU to conv2.
    assert codes.per_step == [12, 12 + 32, 32 + 4, 4 + 16, 16]
    assert (codes.nbytes, codes.step) == (44, "conv1")
    assert peak_memory(steps, lambda r: r.numel).per_step == [12, 44, 32 + 8, 8 + 16, 16]


def test_liveness_residual_by_hand() -> None:
    steps = [
        Step("x", nbytes=16, is_input=True),
        Step("conv1", qreads=(QRead("x", 2, 4),), nbytes=16),
        Step("relu", reads=("conv1",), nbytes=16, elementwise=True),
        Step("conv2", qreads=(QRead("relu", 2, 4),), nbytes=16),
        Step("add", reads=("conv2", "x"), nbytes=16, elementwise=True),
        Step("output", reads=("add",)),
    ]
    # The shortcut keeps x in full precision until the add, which runs in place on conv2's buffer.
    assert peak_memory(steps).per_step == [16, 32, 32, 48, 32, 16]
    codes = peak_memory(steps, lambda r: r.nbytes)
    assert codes.per_step == [16, 32, 32 + 2, 16 + 2 + 16, 32, 16]
    assert (codes.nbytes, codes.step) == (34, "relu")
    assert ("x (full precision)", 16) in codes.live


def test_liveness_views_and_fresh_codes() -> None:
    steps = [
        Step("x", nbytes=8, is_input=True),
        Step("pool", reads=("x",), nbytes=64),
        Step("flat", reads=("pool",), alias="pool"),  # a view: no bytes of its own
        Step("fc", qreads=(QRead("flat", 3, 16),), nbytes=4),
        Step("cat", reads=("x", "fc"), nbytes=12),  # allocates; read only through a quantizer below
        Step("head", qreads=(QRead("cat", 2, 3),), nbytes=4),
        Step("output", reads=("head",)),
    ]
    assert peak_memory(steps).per_step == [8, 72, 72, 72 + 4, 8 + 4 + 12, 12 + 4, 4]
    # pool's buffer ends at the view, whose codes are made there; cat writes codes directly.
    assert peak_memory(steps, lambda r: r.nbytes).per_step == [8, 72, 72 + 3, 8 + 3 + 4, 8 + 4 + 2, 2 + 4, 4]
    with pytest.raises(ValueError, match="no earlier step"):
        peak_memory([Step("a", reads=("b",))])


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x))) + x


def test_recorded_residual_graph_by_hand() -> None:
    model, _ = calibrated(Residual(), (8, 4, 2, 2), first_layer_bits=None)
    _, report = run_compressed(model, torch.randn(1, 4, 2, 2))  # every tensor: 16 float32 values, 64 bytes
    assert [s.name for s in report.steps] == ["x", "conv1", "relu", "conv2", "add", "output"]
    assert report.fp32.per_step == [64, 128, 128, 192, 128, 64]
    (first, second) = report.blobs
    assert (first.value, first.stored, second.value, second.stored) == ("x", False, "relu", True)
    b = second.nbytes
    assert report.stored.per_step == [64, 128, 128 + b, 64 + b + 64, 128, 64]
    assert report.int8.per_step == [64, 128, 128 + 16, 64 + 16 + 64, 128, 64]


def test_a_sliced_input_counts_its_own_bytes_not_its_batch_storage() -> None:
    # batch[:1] views the whole batch's storage: the pass must count one image, as for a copy of it
    model, x = calibrated(build_model("resnet20"), (8, 3, 32, 32))
    _, view = run_compressed(model, x[:1])
    _, copy = run_compressed(model, x[:1].clone())
    assert view.per_image() == copy.per_image()
    assert view.fp32.live == copy.fp32.live


def test_runner_traces_once_and_reads_the_quantizers_current_state() -> None:
    """A CompressedRunner gives run_compressed's output and report on every call, and sees a recalibration."""
    torch.manual_seed(0)
    model, x = calibrated(build_model("resnet20"), (2, 3, 16, 16))
    runner = CompressedRunner(model)
    for batch in (x, x.flip(0)[:1]):
        out, report = runner(batch)
        want, want_report = run_compressed(model, batch)
        assert torch.equal(out + 0.0, want + 0.0)
        assert report.blobs == want_report.blobs
        assert report.stored.nbytes == want_report.stored.nbytes and report.fp32.nbytes == want_report.fp32.nbytes
    q = quantizers_of(model)["layer1.0.conv2"]
    before = runner(x)[1].layer_bytes["layer1.0.conv2"]
    with torch.no_grad():
        q.scale.mul_(4.0)  # in place: a cached layer state that missed this would code with the old scales
        q.important.zero_()
        expected = model(x)
    out, report = runner(x)
    assert torch.equal(out + 0.0, expected + 0.0)
    assert report.layer_bytes["layer1.0.conv2"] < before  # no important channel: no shifting errors stored


def test_runner_puts_the_quantizers_back_and_refuses_a_changed_plan() -> None:
    torch.manual_seed(0)
    model, x = calibrated(build_model("resnet20"), (2, 3, 16, 16))
    installed = quantizers_of(model)
    runner = CompressedRunner(model)
    with pytest.raises(ValueError, match="'conv1': expected 3 channels"):
        runner(torch.randn(2, 5, 16, 16))  # fails inside the pass, with the stand-ins in place
    assert quantizers_of(model) == installed  # the quantizers are back on their layers
    installed["layer2.0.conv1"].enabled = False
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv1' no longer writes codes.*make a new one"):
        runner(x)


def layer_and_activation() -> tuple[ActivationQuantizer, torch.Tensor]:
    """A calibrated ResNet-20 layer's quantizer and a ReLU-like activation of its input's shape."""
    torch.manual_seed(0)
    model, _ = calibrated(build_model("resnet20"), (2, 3, 16, 16))
    q = quantizers_of(model)["layer1.0.conv2"]
    return q, torch.randn(2, q.num_channels, 16, 16).relu()


def round_trips(q: ActivationQuantizer, a: torch.Tensor) -> bool:
    """Whether ``a``'s blob decodes to exactly ``q(a)``."""
    return torch.equal(bytes_to_values(q, quantizer_to_bytes(q, a)), q(a))


def test_layer_state_follows_in_place_changes() -> None:
    """The per-layer tables the byte path keeps are remade when scales, widths or important channels change."""
    q, a = layer_and_activation()
    with torch.no_grad():
        for change in (
            lambda: q.scale.mul_(0.5),
            lambda: q.important.copy_(~q.important),
            lambda: q.set_widths(4, 2),
            lambda: q.error_counts.add_(torch.arange(q.error_counts.numel())),
        ):
            change()
            assert round_trips(q, a)


def test_layer_state_of_inference_tensors_is_made_at_each_call() -> None:
    """Buffers written under ``torch.inference_mode`` (Trainer.validate) have no version counter: nothing is kept."""
    q, a = layer_and_activation()
    with torch.inference_mode():
        q.scale = q.scale.clone()  # an inference tensor, as a buffer calibrated inside validate would be
        assert round_trips(q, a)
        q.scale.mul_(0.5)  # in place, without a version counter
        assert round_trips(q, a)
