"""Memory ledger: hand-computed figures, the per-tensor accounting rule, reset and state merging."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dqa.codec import HuffmanCodebook, encode, symbol_counts
from lightning_dqa.core import functional as F
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.accounting import MemoryLedger, TensorBits, tensor_bits


def test_hand_computed_ledger() -> None:
    ledger = MemoryLedger(["conv1", "conv2"])
    # conv1: 1000 values at 3 bits, 400 errors coded in 500 bits (1200 raw at m = 3), 300 side bits.
    ledger.update("conv1", numel=1000, main_bits=3000, error_bits=500, side_bits=300, raw_error_bits=1200)
    # conv2: two updates of 500 values at 4 bits, no errors, 100 side bits each.
    ledger.update(1, numel=500, main_bits=2000, side_bits=100)
    ledger.update("conv2", numel=500, main_bits=2000, side_bits=100, tensors=1)
    out = {k: float(v) for k, v in ledger.compute().items()}
    assert out["conv1/bits"] == 3800 and out["conv1/bits_per_value"] == 3.8
    assert out["conv1/uniform_bits_per_value"] == 3.0 and out["conv1/nominal_bits_per_value"] == 4.2
    assert out["conv1/error_bits_per_value"] == 0.5 and out["conv1/side_bits_per_value"] == 0.3
    assert out["conv1/memory_bytes"] == 475 and out["conv1/fp32_bytes"] == 4000 and out["conv1/fp32_bits"] == 32000
    assert out["conv1/saving_vs_fp32"] == pytest.approx(1 - 3.8 / 32)
    assert out["conv2/tensors"] == 2 and out["conv2/bytes_per_tensor"] == 4200 / 8 / 2
    assert out["conv2/bits_per_value"] == 4.2 and out["conv2/uniform_bits_per_value"] == 4.0
    # Totals: 8000 bits over 2000 values.
    assert out["total/numel"] == 2000 and out["total/bits"] == 8000 and out["total/bits_per_value"] == 4.0
    assert out["total/uniform_bits_per_value"] == 3.5 and out["total/saving_vs_fp32"] == 0.875
    assert out["total/tensors"] == 3
    assert set(k.split("/")[0] for k in out) == {"total", "conv1", "conv2"}


def test_reset_and_empty_layers() -> None:
    ledger = MemoryLedger(["a", "b"])
    ledger.update("a", numel=10, main_bits=30)
    out = ledger.compute()
    assert float(out["a/bits_per_value"]) == 3.0 and math.isnan(float(out["b/bits_per_value"]))
    ledger.reset()
    assert torch.count_nonzero(ledger.ledger) == 0
    ledger.update("b", numel=4, main_bits=8)
    assert float(ledger.compute()["total/bits_per_value"]) == 2.0


def test_states_merge_by_sum() -> None:
    # What DDP's sync does: the (L, 6) states of all processes are summed.
    a, b = MemoryLedger(["x"]), MemoryLedger(["x"])
    a.update("x", numel=10, main_bits=30, error_bits=5)
    b.update("x", numel=30, main_bits=90, side_bits=15)
    a.merge_state(b)
    assert float(a.compute()["x/bits_per_value"]) == (30 + 5 + 90 + 15) / 40
    assert a.ledger.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": "nope", "numel": 1, "main_bits": 1}, "Unknown layer"),
        ({"layer": 2, "numel": 1, "main_bits": 1}, r"index in \[0, 0\]"),
        ({"layer": "x", "numel": -1, "main_bits": 1}, "numel"),
        ({"layer": "x", "numel": 1, "main_bits": 1.5}, "main_bits"),
    ],
)
def test_update_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryLedger(["x"]).update(**kwargs)


def test_constructor_rejects_bad_names() -> None:
    for names in ([], ["a", "a"], ["total"], [""]):
        with pytest.raises(ValueError, match="layer"):
            MemoryLedger(names)


def test_tensor_bits_hand_computed() -> None:
    # One sample, two channels of four values, channel 0 important; n = 3, m = 3, max |x| = 4 on both, so
    # scale_3 = 4 / 2**2 = 1 and the 6-bit scale 1 / 8. Channel 0: 0, 0.125, 0.25, 1 -> Q = 0, 1, 2, 8 ->
    # main codes 0, 0, 0, 1 and shifting errors 0, 1, 2, 0.
    x = torch.tensor([[[[0.0, 0.125], [0.25, 1.0]], [[4.0, -4.0], [1.0, 2.0]]]])  # (1, 2, 2, 2)
    important = torch.tensor([True, False])
    main, error, scale_n = F.dqa_quantize(x, torch.tensor([4.0, 4.0]), 3, 3, important, signed=True)
    assert error.flatten().tolist() == [0, 1, 2, 0] and scale_n.tolist() == [1.0, 1.0]
    book = HuffmanCodebook.from_lengths([1, 2, 3, 4, 5, 6, 7, 7])  # codes 0, 10, 110, ...
    # Code book: 23-bit header + 8 fields of bit_length(7 - 1) = 3 bits = 47 bits.
    assert book.size_bits == 47
    tb = tensor_bits(main, error, scale_n, bits=3, codebook=book, scales="dynamic")
    # 8 values x 3 bits; errors 1 + 2 + 3 + 1 bits; 2 scales x 32 + 47; 4 errors x 3 raw bits.
    assert tb == TensorBits(numel=8, main_bits=24, error_bits=7, side_bits=64 + 47, raw_error_bits=12, tensors=1)
    ledger = MemoryLedger(["layer"])
    ledger.update_bits("layer", tb)
    out = ledger.compute()
    assert float(out["layer/bits_per_value"]) == (24 + 7 + 111) / 8
    assert float(out["layer/nominal_bits_per_value"]) == 3 + 0.5 * 3  # n + r * m with r = 1/2
    static = tensor_bits(main, error, scale_n, bits=3, codebook=book, scales="static")
    assert static.side_bits == 47  # static scales are model constants: only the code book is charged


def test_tensor_bits_charges_side_info_per_sample() -> None:
    main = torch.zeros(4, 3, 2, 2, dtype=torch.int32)
    error = torch.zeros(4, 1, 2, 2, dtype=torch.int32)
    book = HuffmanCodebook.from_counts([1, 1])
    tb = tensor_bits(main, error, torch.ones(3), bits=4, codebook=book)
    assert tb.tensors == 4 and tb.side_bits == 4 * (3 * 32 + book.size_bits)
    assert tensor_bits(main, error, torch.ones(3), 4, book, batch_dim=None).side_bits == 3 * 32 + book.size_bits
    no_errors = tensor_bits(main, error[:, :0], torch.ones(3), bits=4, codebook=None)
    assert no_errors.error_bits == 0 and no_errors.side_bits == 4 * 3 * 32
    with pytest.raises(ValueError, match="codebook"):
        tensor_bits(main, error, torch.ones(3), bits=4, codebook=None)
    with pytest.raises(ValueError, match="scales"):
        tensor_bits(main, error, torch.ones(3), bits=4, codebook=book, scales="learned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"symbols in \[0, 1\]"):
        tensor_bits(main, error + 2, torch.ones(3), bits=4, codebook=book)


def test_quantizer_codes_agree_with_the_codec() -> None:
    torch.manual_seed(0)
    q = ActivationQuantizer(8, bits=3, extra_bits=3, scale_mode="dynamic", signed=False)
    q.important[:3] = True
    x = torch.relu(torch.randn(2, 8, 6, 6))
    main, error, scale_n = q.codes(x)
    book = HuffmanCodebook.from_counts(symbol_counts(error, 8))
    tb = tensor_bits(main, error, scale_n, bits=3, codebook=book)
    assert tb.numel == 2 * 8 * 36 and tb.main_bits == 3 * tb.numel
    assert tb.error_bits == encode(error, book).bit_count  # the histogram count is the coded size
    assert tb.raw_error_bits == 2 * 3 * 36 * 3
    assert tb.side_bits == 2 * (8 * 32 + book.size_bits)
