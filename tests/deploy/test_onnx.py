"""ONNX export (``lightning_dqa.deploy.onnx.export``): onnxruntime against PyTorch's fake-quantized forward pass.

Tiny model: every layer's QDQ output is compared with the PyTorch quantizer fed the very same tensor (the one
onnxruntime saw), so a code mismatch is a rounding difference of that layer alone, never one carried over from
an earlier layer. PyTorch rounds ``x * (1 / s)``, ``QuantizeLinear`` ``x / s``: the two may differ at a tie, by
exactly one step; the mismatch rate is asserted below 1e-4 (measured: 0 to a few in 10**6).

ResNet-32 (the acceptance test, ``slow``): the pretrained model on the first 2,000 CIFAR-10 test images, direct
and DQA at 3 and 4 bits with the project's default settings, calibrated on 256 training images. Layer by layer
(``verify_onnx`` on 200 images, each QDQ subgraph fed what onnxruntime fed it) 3 to 13 of 60.4 million codes
differ, each by one step at a rounding tie: asserted below 1e-6 and at most one step. This is what carries the
export's correctness, and it holds on any CPU: fed the same tensor, ``x / s`` and ``x * (1 / s)`` are each
correctly rounded IEEE-754 float32 operations, so they can only part at a tie, whatever the kernels upstream.

End to end, top-1 agreement is float32 noise that differs between CPUs (on one machine 99.80-99.90 %, on a 2-core
AVX2 EPYC 99.70 % for DQA 4-bit): one kernel moves a value across a rounding boundary and the other code travels on
through the network. So it is not compared with a constant read off one machine but with a floor measured in the
same run: PyTorch against itself with a different convolution (oneDNN and NNPACK off: its im2col + GEMM path),
a change of kernel alone. onnxruntime may disagree with PyTorch more than that only by what counting
2,000 images can show (:func:`within_kernel_noise`). The accuracy gap is at most the share of images that
disagree, so it is printed, not asserted separately. The issue's target (99.9 % agreement, 0.05 points) is met
by direct 3-bit only, as the README says.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from tiny_engine import config, fwd, loss, make_batches, tiny
from torch import nn

from lightning_dqa import DQAConfig
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.core.attach import prepare, quantizers_of, set_quantizers_enabled
from lightning_dqa.deploy.onnx.export import export_onnx, require_onnx
from lightning_dqa.deploy.onnx.verify import verify_onnx

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx: pip install 'lightning-dqa[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime: pip install 'lightning-dqa[onnx]'")

pytestmark = pytest.mark.usefixtures("single_thread")


def session(path, threads: int = 1):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def calibrated_tiny(**kw) -> nn.Module:
    cfg = config(**kw)
    model = tiny()
    prepare(model, cfg)
    calibrate(model, cfg, make_batches(), forward_fn=fwd, loss_fn=loss)
    return model.eval()


CASES = {
    "dqa": dict(method="dqa"),
    "direct": dict(method="direct"),
    "dqa_signed": dict(method="dqa", code="signed"),
    "dqa_unsigned": dict(method="dqa", code="unsigned"),
    "direct_unsigned": dict(method="direct", code="unsigned"),
    "dqa_int16_first": dict(method="dqa", first_layer_bits=8),
    "dqa_3bit_m5": dict(method="dqa", bits=3, extra_bits=5),
    "dqa_dynamic": dict(method="dqa", scale_mode="dynamic"),
    "dqa_learnable": dict(method="dqa", scale_mode="learnable"),
    "noisyquant": dict(method="noisyquant"),
    "dqa_output": dict(method="dqa", where="output"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_onnxruntime_matches_pytorch(case, tmp_path):
    model = calibrated_tiny(**CASES[case])
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "tiny.onnx")
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    check = verify_onnx(model, path, x)
    bad, total = check.mismatched, check.values
    print(
        f"{case}: {bad} of {total} codes differ ({bad / total:.2e}); output max abs diff "
        f"{check.output_max_abs_diff:.2e}"
    )
    assert [c.name for c in check.layers] == [q.name for q in quantizers_of(model).values() if not q.passthrough]
    seen: dict[str, int] = {}  # values each quantizer sees in PyTorch's forward pass
    hooks = [
        q.register_forward_pre_hook(lambda m, a: seen.__setitem__(m.name, a[0].numel()))
        for q in quantizers_of(model).values()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert {c.name: c.values for c in check.layers} == {
        k: v for k, v in seen.items() if k in {c.name for c in check.layers}
    }
    assert check.off_tie == 0  # every difference is a tie rounded the other way ...
    assert check.max_steps <= 1.0 + 1e-4  # ... by exactly one step
    assert bad / total < 1e-4
    assert check.output_max_abs_diff < 1e-3


def test_verify_onnx_finds_a_wrong_scale_and_leaves_the_file_alone(tmp_path):
    model = calibrated_tiny(method="dqa")
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    scale = next(i for i in proto.graph.initializer if i.name.endswith("conv2/scale"))
    values = onnx.numpy_helper.to_array(scale).copy()
    values[3] *= 1.5  # one channel of conv2's input quantized on the wrong grid
    scale.CopyFrom(onnx.numpy_helper.from_array(values, scale.name))
    onnx.save(proto, str(path))
    before = path.read_bytes()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    check = verify_onnx(model, path, x)
    by_name = {c.name: c for c in check.layers}
    assert by_name["conv2"].off_tie > 0 and by_name["conv2"].max_steps > 1.0
    assert by_name["conv1"].mismatched == 0  # upstream of the damage, fed the same input
    assert path.read_bytes() == before


def test_verify_onnx_refuses_a_file_from_another_model(tmp_path):
    path = export_onnx(calibrated_tiny(method="dqa"), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    other = calibrated_tiny(method="dqa", first_layer_bits=0)  # conv1 passes through in full precision here
    with pytest.raises(
        ValueError, match=r"Expected the QDQ layers of .* to be quantized layers of TinyNet, got \['conv1'\]"
    ):
        verify_onnx(other, path, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"one tensor per input of .*\(\['input'\]\), got 2 tensor"):
        verify_onnx(calibrated_tiny(method="dqa"), path, (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)))


def test_tiny_graph_layout(tmp_path):
    model = calibrated_tiny(method="dqa", first_layer_bits=8, code="auto")
    path = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 21  # the 11-bit first layer needs int16
    quant = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert [n.name.split("/")[1] for n in quant] == ["conv1", "conv2", "conv3", "fc"]
    zero_points = {i.name: i.data_type for i in proto.graph.initializer if i.name.endswith("zero_point")}
    types = [zero_points[n.input[2]] for n in quant]
    assert types == [onnx.TensorProto.INT16] + [onnx.TensorProto.UINT8] * 3  # signed image, then post-ReLU
    axes = [onnx.helper.get_attribute_value(n.attribute[0]) for n in quant]
    assert axes == [1, 1, 1, 1]  # conv inputs (N, C, H, W); fc's input is (N, C)
    assert "lightning_dqa.quantized_layers" in {p.key for p in proto.metadata_props}
    out = session(path).run(None, {"input": torch.randn(5, 3, 8, 8).numpy()})[0]
    assert out.shape == (5, 5)  # dynamic batch axis


def test_int8_model_defaults_to_opset_13_and_rejects_low_opset_for_int16(tmp_path):
    path = export_onnx(calibrated_tiny(method="dqa"), torch.randn(1, 3, 8, 8), tmp_path / "a.onnx")
    assert onnx.load(str(path)).opset_import[0].version == 13
    with pytest.raises(ValueError, match=r"Layer 'conv1'.*int16 carrier.*opset=17"):
        export_onnx(
            calibrated_tiny(method="dqa", first_layer_bits=8), torch.randn(1, 3, 8, 8), tmp_path / "b", opset=17
        )
    with pytest.raises(ValueError, match=r"Expected opset to be an int in \[13,"):
        export_onnx(calibrated_tiny(method="dqa"), torch.randn(1, 3, 8, 8), tmp_path / "c.onnx", opset=11)


def test_passthrough_layers_stay_float(tmp_path):
    model = calibrated_tiny(method="dqa", first_layer_bits=0)
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    names = [n.name.split("/")[1] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert names == ["conv2", "conv3", "fc"]
    fp = calibrated_tiny(method="fp32")
    path = export_onnx(fp, torch.randn(1, 3, 8, 8), tmp_path / "fp.onnx")
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def test_uncalibrated_model_names_the_layer(tmp_path):
    model = tiny()
    prepare(model, config())
    with pytest.raises(ValueError, match=r"Layer 'conv1': expected a calibrated quantizer.*lightning_dqa.calibrate"):
        export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_switched_off_quantizers_and_bare_models_are_refused(tmp_path):
    model = calibrated_tiny()
    set_quantizers_enabled(model, False)
    with pytest.raises(ValueError, match=r"Layer 'conv1'.*enabled=False"):
        export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"Expected TinyNet to carry quantizers"):
        export_onnx(tiny(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")


def test_export_leaves_the_model_unchanged(tmp_path):
    model = calibrated_tiny().train()
    x = torch.randn(4, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, x, tmp_path / "m.onnx")
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(q).__name__ == "ActivationQuantizer" for q in quantizers_of(model).values())


def test_missing_onnx_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-dqa\[onnx\]'"):
        require_onnx()


# ------------------------------------------------------------------------------------- acceptance: ResNet-32
@pytest.fixture(scope="module")
def cifar(cifar_root, resnet32_weights):
    from torch.utils.data import DataLoader

    from lightning_dqa.demos.data import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(cifar_root), limit_test=2000, eval_batch_size=500)
    dm.setup("test")
    images, labels = next(iter(DataLoader(dm.test_set, batch_size=2000)))  # (2000, 3, 32, 32), (2000,)
    calib = list(DataLoader(dm.calibration_subset(256, seed=0), batch_size=128))
    return images, labels, calib


def resnet32(weights) -> nn.Module:
    from lightning_dqa.demos.models import build_model, load_pretrained

    return load_pretrained(build_model("resnet32"), str(weights)).eval()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "bits"), [("direct", 3), ("dqa", 3), ("direct", 4), ("dqa", 4)])
def test_resnet32_onnxruntime_agrees_with_pytorch(method, bits, cifar, resnet32_weights, tmp_path):
    images, labels, calib = cifar
    start = time.perf_counter()
    model, cfg = resnet32(resnet32_weights), DQAConfig(bits=bits, method=method)
    prepare(model, cfg)
    calibrate(model, cfg, calib, forward_fn=lambda m, b: m(b[0]), loss_fn=lambda m, b: TF.cross_entropy(m(b[0]), b[1]))
    path = export_onnx(model, images[:1], tmp_path / "resnet32.onnx")
    sess = session(path, threads=2)
    with torch.no_grad():
        torch_pred = torch.cat([model(x).argmax(1) for x in images.split(500)])
    ort_pred = torch.cat(
        [torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]).argmax(1) for x in images.split(500)]
    )
    check = verify_onnx(model, path, images[:200], threads=2)  # each layer fed what onnxruntime fed it
    print(
        f"resnet32 {method} {bits}-bit, layer by layer: {check.mismatched} of {check.values} codes differ, "
        f"at most {check.max_steps:.3f} step"
    )
    assert check.off_tie == 0 and check.max_steps <= 1.0 + 1e-4  # only ties, one step apart
    # A count of values within float32 rounding of a tie: measured 3 to 13 in 60.4 million, the bound is 60. The
    # share near a tie is set by the data and float32's precision; another CPU's kernels move which values sit
    # there (by a few ulps upstream), not how many.
    assert check.mismatched / check.values < 1e-6
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        native_pred = torch.cat([model(x).argmax(1) for x in images.split(500)])  # another convolution kernel
    n = len(labels)
    ort_flips, kernel_flips = int((torch_pred != ort_pred).sum()), int((torch_pred != native_pred).sum())
    acc_torch = 100 * float((torch_pred == labels).float().mean())
    acc_ort = 100 * float((ort_pred == labels).float().mean())
    print(
        f"resnet32 {method} {bits}-bit: agreement {100 * (1 - ort_flips / n):.2f} % (PyTorch native conv vs "
        f"default: {100 * (1 - kernel_flips / n):.2f} %), accuracy PyTorch {acc_torch:.2f} %, onnxruntime "
        f"{acc_ort:.2f} %, {time.perf_counter() - start:.1f} s"
    )
    assert within_kernel_noise(ort_flips, kernel_flips, n), (ort_flips, kernel_flips, n)


def within_kernel_noise(flips: int, floor_flips: int, n: int, z: float = 3.0) -> bool:
    """Whether ``flips`` of ``n`` top-1 disagreements are no more than ``floor_flips`` of ``n`` plus counting noise.

    The two counts are read as binomial draws; the margin is ``z`` standard errors of the difference of two
    proportions with the pooled estimate ``p = (flips + floor_flips) / 2n``, i.e. ``z * sqrt(2 p (1 - p) / n)``.
    Treating the draws as independent overstates the error of the difference (the same fragile images tend to
    flip under both kernels), so at ``z = 3`` a runtime as noisy as PyTorch's second kernel fails well under 0.2 %
    of the time. Of 2,000 images, with a floor of 0 flips up to 8 pass (99.60 % agreement), with 4 up to 18; 40
    flips (98 % agreement) fail against any floor under 18.

    Args:
        flips: images whose top-1 class the runtime under test changes.
        floor_flips: images whose top-1 class the reference change of kernel alone changes.
        n: images compared.
        z: standard errors of margin.

    """
    p = (flips + floor_flips) / (2 * n)
    return flips / n <= floor_flips / n + z * math.sqrt(2 * p * (1 - p) / n)


@pytest.mark.parametrize(
    ("flips", "floor_flips", "passes"),
    [
        (0, 0, True),
        (6, 1, True),
        (8, 0, True),
        (9, 0, False),
        (18, 4, True),
        (19, 4, False),
        (40, 17, False),
        (200, 4, False),
    ],
)
def test_within_kernel_noise_bound(flips, floor_flips, passes):
    """The end-to-end bound of the ResNet-32 test can fail: a few flips pass, a broken export's many do not."""
    assert within_kernel_noise(flips, floor_flips, 2000) is passes


# ------------------------------------------------------------------------------------- torchvision models
TORCHVISION = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5"]


@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_models_export_and_verify_layer_by_layer(arch, tmp_path):
    from torchvision import models

    torch.manual_seed(0)
    model = getattr(models, arch)(weights=None, num_classes=10).eval()
    cfg = DQAConfig(bits=4, method="dqa")
    prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    calibrate(model, cfg, calib, forward_fn=lambda m, b: m(b[0]), loss_fn=lambda m, b: TF.cross_entropy(m(b[0]), b[1]))
    x = torch.randn(8, 3, 32, 32, generator=g)
    check = verify_onnx(model, export_onnx(model, x[:1], tmp_path / f"{arch}.onnx"), x)
    quantizing = [q.name for q in quantizers_of(model).values() if not q.passthrough]
    print(f"{arch}: {check.mismatched} of {check.values} codes differ, at most {check.max_steps:.0f} step")
    assert sorted({c.name for c in check.layers}) == sorted(quantizing)
    assert check.off_tie == 0 and check.max_steps <= 1.0 + 1e-4  # only ties, one step apart
    # measured: 0 / 18 / 0 / 35 of 180,000-360,000 codes, each within float32 rounding of a tie (random weights,
    # 32x32 inputs: far more near-ties than ResNet-32's 3-13 in 60 million)
    assert check.mismatched / check.values < 1e-3


def test_a_checkpoint_loaded_with_load_from_checkpoint_exports_and_verifies(tmp_path):
    """The everyday deployment path: fit with the callback, ``MyModule.load_from_checkpoint``, export, check."""
    from tiny import TinyNet, fit_quantized, make_data

    ckpt, _ = fit_quantized(tmp_path)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    x = make_data(64, 3).tensors[0]
    path = export_onnx(loaded, x[:1], tmp_path / "deployed.onnx")
    check = verify_onnx(loaded, path, x)
    assert check.off_tie == 0 and check.max_steps <= 1.0 + 1e-4
    assert len(check.layers) == sum(not q.passthrough for q in quantizers_of(loaded).values())
    with torch.no_grad():
        expected = loaded.eval()(x).numpy()
    got = session(path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_a_segmentation_model_returning_a_dict_exports_and_verifies(tmp_path):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    cfg = DQAConfig(bits=4, method="dqa")
    prepare(model, cfg)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 5, (4, 64, 64), generator=g)) for _ in range(2)]
    calibrate(
        model,
        cfg,
        calib,
        forward_fn=lambda m, b: m(b[0])["out"],
        loss_fn=lambda m, b: TF.cross_entropy(m(b[0])["out"], b[1]),
    )
    x = torch.randn(3, 3, 64, 64, generator=g)
    path = export_onnx(model, x[:1], tmp_path / "seg.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output"]  # {"out": ...} -> one tensor
    check = verify_onnx(model, path, x)
    assert check.off_tie == 0 and check.max_steps <= 1.0 + 1e-4
    assert check.output_max_abs_diff < 1e-3


class TwoHeads(nn.Module):
    """Returns ``(logits, {"features": pooled})``: several outputs, nested."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):
        pooled = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(pooled), {"features": pooled}


def test_several_outputs_are_named_in_order_with_a_dynamic_batch_and_all_verified(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    cfg = config(method="dqa")
    prepare(model, cfg)
    calibrate(model, cfg, make_batches(), forward_fn=lambda m, b: m(b[0])[0])
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "two.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output_0", "output_1"]
    x = torch.randn(5, 3, 8, 8)
    logits, features = session(path).run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref_logits, ref = model(x)
    assert logits.shape == (5, 4) and features.shape == (5, 6)
    assert np.abs(features - ref["features"].numpy()).max() < 1e-5
    assert np.abs(logits - ref_logits.numpy()).max() < 1e-4
    check = verify_onnx(model, path, x)
    assert check.off_tie == 0 and check.output_max_abs_diff < 1e-4
