"""Shared fixtures: the read-only ``../shared`` folder beside the repository, and paths inside it.

Each fixture skips the test with the reason when its files are absent, so the suite runs without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from native_required import require_native_kernel

from lightning_dqa.codec.native import NativeKernels

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (expected in ../shared beside the repository)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder (data, weights, docs)."""
    return _require(SHARED_DIR, "the shared folder")


@pytest.fixture(scope="session")
def cifar_root(shared_dir: Path) -> Path:
    """The folder holding ``cifar-10-batches-py/``."""
    root = shared_dir / "data" / "cifar10"
    _require(root / "cifar-10-batches-py", "CIFAR-10 (cifar-10-batches-py)")
    return root


@pytest.fixture(scope="session")
def camvid_root(shared_dir: Path) -> Path:
    """The CamVid folder with ``train.txt``, ``val.txt`` and ``test.txt``."""
    root = shared_dir / "data" / "camvid"
    _require(root / "train.txt", "CamVid (train.txt)")
    return root


@pytest.fixture(scope="session")
def resnet32_weights(shared_dir: Path) -> Path:
    """The pretrained CIFAR-10 ResNet-32 checkpoint."""
    return _require(shared_dir / "weights" / "resnet32-d509ac18.th", "the ResNet-32 weights")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine (restored afterwards).

    Modules that use it say so with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def native_kernel() -> NativeKernels:
    """The byte path's C++ kernel; without it the test skips, or fails where it is required (CI)."""
    return require_native_kernel()


_REAL_DATA = ("shared_dir", "cifar_root", "camvid_root", "resnet32_weights")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that reads ``../shared`` (real data or weights) ``slow``: ``-m "not slow"`` deselects them.

    CI runs everything; the marker only lets a developer run the quick part while working.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()  # e.g. request.getfixturevalue(param)
        if any(name in getattr(item, "fixturenames", ()) or name in params for name in _REAL_DATA):
            item.add_marker(pytest.mark.slow)
