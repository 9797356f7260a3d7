"""GPU readiness: a calibrated model's forward pass never synchronises host and device.

A host-device sync is any op that reads a device value back on the host (``.item()``, ``int(t)``,
``bool(t)``, ``.tolist()``, ``.cpu()``, ``torch.nonzero``). On CPU these show up as the aten ops counted below,
so the check runs without a GPU.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyNet, make_data
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.core.attach import quantizers_of, set_quantizers_enabled
from lightning_dqa.deploy.meter import MemoryMeter

pytestmark = pytest.mark.usefixtures("single_thread")

SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "_to_copy", "tolist")


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a tensor back on the host (``_to_copy`` only when it leaves the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and (name != "_to_copy" or _to_host(args, kwargs)):
            self.counts[name] += 1
        return func(*args, **kwargs)


def _to_host(args: tuple, kwargs: dict) -> bool:
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


def calibrated_tiny(method: str, scale_mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = TinyNet().net
    clipping = "none" if scale_mode == "dynamic" else "mse"
    config = DQAConfig(bits=4, method=method, scale_mode=scale_mode, clipping=clipping)
    prepare(net, config)
    calibrate(
        net, config, DataLoader(make_data(64, 3), batch_size=32),
        forward_fn=lambda m, b: m(b[0]), loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), num_samples=64,
    )  # fmt: skip
    return net.eval()


def forward_syncs(net: torch.nn.Module, x: torch.Tensor) -> Counter[str]:
    counter = SyncCounter()
    with torch.no_grad(), counter:
        net(x)
    return counter.counts


CASES = [
    ("dqa", "static"),
    ("dqa", "dynamic"),
    ("dqa", "learnable"),
    ("direct", "static"),
    ("direct", "dynamic"),
    ("direct", "learnable"),
    ("noisyquant", "static"),
    ("fp32", "static"),
]


@pytest.mark.parametrize(("method", "scale_mode"), CASES)
def test_calibrated_forward_has_no_host_sync(method: str, scale_mode: str):
    net = calibrated_tiny(method, scale_mode)
    meter = MemoryMeter(net)  # installed but inactive, as outside validation / test epochs
    qs = quantizers_of(net).values()
    assert all(bool(q.calibrated) and q.enabled for q in qs)
    assert forward_syncs(net, make_data(8, 5).tensors[0]) == Counter()
    meter.remove()


def test_mirrors_follow_the_buffers_through_load_state_dict_and_calibration():
    net = calibrated_tiny("dqa", "dynamic")
    fresh = TinyNet().net
    prepare(fresh, DQAConfig(bits=3, code="signed", scale_mode="dynamic", clipping="none"))
    set_quantizers_enabled(fresh, True)
    state = net.state_dict()
    key = next(k for k in state if k.endswith("dqa_quantizer.signed") and not bool(state[k]))
    fresh.load_state_dict(state, strict=False)
    q = fresh.get_submodule(key.rsplit(".", 1)[0])
    assert (q.n, q.m, q.is_signed) == (int(q.bits), int(q.extra_bits), bool(q.signed)) == (4, 3, False)
    x = make_data(8, 5).tensors[0]
    torch.testing.assert_close(fresh.eval()(x), net(x), rtol=0, atol=0)


def test_the_active_memory_meter_adds_no_host_sync_either():
    """The meter measures every validation batch: its histograms stay on the device until compute()."""
    for scale_mode in ("static", "dynamic"):
        net = calibrated_tiny("dqa", scale_mode)
        meter = MemoryMeter(net)
        meter.build_codebooks()
        meter.active = True
        assert forward_syncs(net, make_data(8, 5).tensors[0]) == Counter(), scale_mode
        print(scale_mode, float(meter.compute()["bits_per_value"]))
        assert meter.compute()["bits_per_value"] > 4.0
        meter.remove()
