"""The memory meter's fast path (histogram of important channels only) equals the full integer-code path."""

from __future__ import annotations

import torch
from tiny import TinyNet, make_data

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.codec import HuffmanCodebook
from lightning_dqa.deploy.accounting import MemoryLedger, tensor_bits
from lightning_dqa.deploy.meter import MemoryMeter


def test_meter_equals_full_code_path():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = make_data(64).tensors[0]
    for cfg in (
        DQAConfig(bits=3, ranking="energy"),
        DQAConfig(bits=4, scale_mode="dynamic", clipping="none", ranking="energy"),
    ):
        quantizers = prepare(model, cfg)
        calibrate(model, cfg, [(x, torch.zeros(64, dtype=torch.long))], forward_fn=lambda m, b: m(b[0]))
        meter = MemoryMeter(model)
        inputs = {}
        hooks = [
            q.register_forward_hook(lambda mod, a, o, n=n, d=inputs: d.__setitem__(n, a[0]))
            for n, q in quantizers.items()
        ]
        meter.active = True
        reference = MemoryLedger(list(quantizers))
        for batch in (x, x[:40].flip(0)):  # two stored tensors per layer: the meter adds them up exactly
            model(batch)
            for name, q in quantizers.items():
                main, err, scale = q.codes(inputs[name])
                book = HuffmanCodebook.from_counts(q.error_counts)
                scales = "dynamic" if q.scale_mode == "dynamic" else "static"
                reference.update_bits(name, tensor_bits(main, err, scale, q.n, book if err.numel() else None, scales))
        for h in hooks:
            h.remove()
        assert meter.has_data()
        meter.flush()
        assert torch.equal(meter.ledger.ledger, reference.ledger)
        summary = meter.compute()
        assert summary["bits_per_value"] > cfg.bits  # errors and side information cost something
        meter.remove()
