"""Content keys of calibration samples: the same key for the same sample whatever batch it arrives in."""

from __future__ import annotations

import torch

from lightning_dqa.calibration.sampling import bottom_k, mix64, position_keys, sample_keys


def test_mix64_matches_splitmix64_reference():
    def ref(x: int) -> int:  # splitmix64's finaliser on Python ints (the published constants)
        mask = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    xs = [0, 1, 2, 12345, -1, 2**62, -(2**63)]
    got = mix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [ref(x & ((1 << 64) - 1)) for x in xs]


def test_sample_key_depends_on_the_row_only():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 5, 5, generator=g), torch.arange(6)
    whole = sample_keys((x, y), 6)
    parts = torch.cat([sample_keys((x[:2], y[:2]), 2), sample_keys((x[2:], y[2:]), 4)])
    assert torch.equal(whole, parts)
    assert whole.unique().numel() == 6
    assert not torch.equal(whole, sample_keys((x, y.flip(0)), 6))  # the label is part of the sample
    assert not torch.equal(whole, sample_keys((x, y), 6, salt=1))


def test_sample_keys_for_dict_batches_odd_byte_counts_and_no_rows():
    batch = {"img": torch.arange(3 * 5, dtype=torch.uint8).reshape(3, 5), "mask": torch.ones(3, 2, dtype=torch.bool)}
    keys = sample_keys(batch, 3)
    assert keys is not None and keys.shape == (3,) and keys.dtype == torch.int64
    assert torch.equal(keys[1:], sample_keys({k: v[1:] for k, v in batch.items()}, 2))
    assert sample_keys({"meta": "x", "img": torch.zeros(4, 2)}, 3) is None  # no tensor holds 3 samples


def test_position_keys_are_distinct_and_bottom_k_drops_repeats():
    keys = position_keys(torch.tensor([5, 9]), 4, salt=3)
    assert keys.shape == (2, 4) and keys.unique().numel() == 8
    k = torch.tensor([7, 3, 7, 1, 9])
    v = torch.arange(10.0).reshape(2, 5)
    kept, vals = bottom_k(k, v, 3)
    assert kept.tolist() == [1, 3, 7]
    assert vals.tolist() == [[3.0, 1.0, 0.0], [8.0, 6.0, 5.0]]
