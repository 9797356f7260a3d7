"""``torch.compile``: a calibrated model compiles to the same outputs, and ``Trainer.validate`` of a compiled
LightningModule runs with the callback and logs the measured memory (the meter runs outside the graph)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_host_sync import calibrated_tiny
from test_user_setups import BareNet, loader, trainer
from tiny import make_data

from lightning_dqa import DQACallback
from lightning_dqa.core.attach import quantizers_of
from lightning_dqa.deploy.meter import MemoryMeter

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler for inductor"),
    # Emulating a CPU without vector units (ATEN_CPU_CAPABILITY=default) breaks torch 2.14's inductor itself: the C++
    # it generates for these graphs uses at::vec::Vectorized, which that setting leaves undeclared ("'at::vec' has not
    # been declared", a compile error inside torch's own code generation). No real x86-64 CPU runs that way.
    pytest.mark.skipif(
        os.environ.get("ATEN_CPU_CAPABILITY") == "default",
        reason="torch inductor cannot compile its vectorized kernels under ATEN_CPU_CAPABILITY=default",
    ),
]


@pytest.mark.parametrize("scale_mode", ["static", "dynamic"])
def test_compiled_calibrated_model_matches_eager(scale_mode: str):
    torch._dynamo.reset()
    net = calibrated_tiny("dqa", scale_mode)
    meter = MemoryMeter(net)  # its hooks are in the traced forward, inactive
    x = make_data(16, 5).tensors[0]
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net)(x)
    torch.testing.assert_close(compiled, eager)
    meter.remove()


@pytest.mark.slow
def test_validate_a_compiled_lightning_module_logs_bits_per_value():
    torch._dynamo.reset()
    model = BareNet()
    cb = DQACallback(bits=4, calibration_samples=32, verbose=False)
    t = trainer(callbacks=[cb], limit_val_batches=2)
    with pytest.warns(UserWarning, match="calibrates on the validation loaders"):
        t.validate(torch.compile(model), dataloaders=loader(64, 1, 16))
    assert all(bool(q.calibrated) and q.enabled for q in quantizers_of(model).values())
    bits = float(t.callback_metrics["dqa/bits_per_value"])
    assert 4.0 <= bits < 32.0

    eager_model = BareNet()
    eager_model.load_state_dict(model.state_dict(), strict=False)
    cb2 = DQACallback(bits=4, calibration_samples=32, verbose=False)
    t2 = trainer(callbacks=[cb2], limit_val_batches=2)
    with pytest.warns(UserWarning, match="calibrates on the validation loaders"):
        t2.validate(eager_model, dataloaders=loader(64, 1, 16))
    assert float(t2.callback_metrics["dqa/bits_per_value"]) == pytest.approx(bits, rel=1e-6)
