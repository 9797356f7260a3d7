"""Whether the byte path's C++ kernel is required: tests that need it fail without it in CI, skip elsewhere."""

from __future__ import annotations

import os

import pytest

from lightning_dqa.codec import native


def native_kernel_required() -> bool:
    """True in CI (``CI`` set, other than ``0``/``false``) or with ``LIGHTNING_DQA_REQUIRE_NATIVE=1``."""
    ci = os.environ.get("CI", "")
    return (ci != "" and ci.lower() not in ("0", "false")) or os.environ.get("LIGHTNING_DQA_REQUIRE_NATIVE") == "1"


def require_native_kernel() -> native.NativeKernels:
    """The kernel; without it, fail the test where it is required (CI), else skip it, with the reason."""
    lib = native.native_library()
    if lib is None:
        reason = f"no native kernel: {native.native_status()}"
        if native_kernel_required():
            pytest.fail(f"{reason} (required: CI or LIGHTNING_DQA_REQUIRE_NATIVE=1 is set)", pytrace=False)
        pytest.skip(reason)
    return lib
