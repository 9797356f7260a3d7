"""Distributed calibration: 2 CPU processes (gloo) end with identical quantizer state, equal to one process."""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from tiny import TinyData, TinyNet

from lightning_dqa import DQACallback

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS")


class SaveQuantizerState(Callback):
    """Each rank writes its quantizer state after evaluation, for the parent process to compare."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_end(self, trainer, pl_module):
        state = {k: v.cpu() for k, v in pl_module.state_dict().items() if ".dqa_quantizer." in k}
        torch.save(state, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def _callback() -> DQACallback:
    # clipping "none" makes scales the exact maximum and "energy" sums exact float64 statistics, so the
    # distributed result must equal the single-process one on the same samples, not just agree across ranks.
    return DQACallback(bits=3, calibration_samples=256, clipping="none", ranking="energy", verbose=False)


def _trainer(tmp_path, **kw) -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


@pytest.mark.parametrize(
    "n", [256, 80], ids=["equal shards", "uneven shards"]  # 80 in batches of 32: rank 0 reads 48, rank 1 reads 32
)
def test_ddp_ranks_reduce_statistics_and_agree(tmp_path, n):
    torch.manual_seed(0)
    model = TinyNet()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    data = TinyData(n=n, batch_size=32)
    trainer = _trainer(
        tmp_path, strategy="ddp_spawn", devices=2, callbacks=[_callback(), SaveQuantizerState(str(tmp_path))]
    )
    trainer.validate(model, datamodule=data, verbose=False)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks disagree"

    single = TinyNet()
    single.load_state_dict(init)
    (tmp_path / "single").mkdir()
    _trainer(tmp_path, devices=1, callbacks=[_callback(), SaveQuantizerState(str(tmp_path / "single"))]).validate(
        single, datamodule=data, verbose=False
    )
    ref = torch.load(tmp_path / "single" / "rank0.pt")
    for k in ref:
        if k.endswith("error_counts"):
            # the code book's histogram comes from a random sample of values, drawn per shard: it only has
            # to agree across ranks (checked above), not with one process
            continue
        assert torch.equal(ref[k], r0[k]), f"{k}: distributed result differs from one process on the same samples"
