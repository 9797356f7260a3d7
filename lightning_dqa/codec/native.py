"""The optional C++ kernels of the byte path (``_bytepath.cpp``), compiled at first use and loaded with ctypes.

Why a small C++ file and not plain torch ops, ``torch.compile`` or numba: storing an activation is one walk over
it that quantizes, shifts, bit-packs the main codes and Huffman-codes the errors, and restoring is the reverse
walk; the bit writer and the Huffman decoder are sequential, data-dependent loops that tensor libraries express
only as many full-size passes (see ``examples/bench_bytepath.py`` for the side-by-side measurement). A C++ loop
does it in one pass with a few bytes of state, and needs nothing beyond a C++ compiler: no new package, no
build step at install time. Without a compiler (or with ``LIGHTNING_DQA_NATIVE=0``) the package falls back to
its numpy/torch path, which writes the same bytes.

The shared library is built with ``g++ -O3 -ffp-contract=off`` (no fast-math, no fused multiply-add, so the
float arithmetic is IEEE round-to-nearest like PyTorch's) into ``$LIGHTNING_DQA_CACHE`` (default
``~/.cache/lightning_dqa``), named by a hash of the source, the flags and the machine, and reused.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["native_library", "native_status"]

_SOURCE = Path(__file__).with_name("_bytepath.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17", "-pthread"]
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_ENCODE_ARGS: list[Any] = [_P, _I64, _I64, _I64, _P, _P, _P, _INT, _INT, _INT, _P, _P, _I64, _P, _P, _P, _P, _INT]
_DECODE_ARGS: list[Any] = [_P, _I64, _P, _I64, _I64, _P, _I64, _P, _P, _INT, _I64, _I64, _I64, _P, _P, _P]
_DECODE_ARGS += [_INT, _INT, _INT, _P, _INT]


def _cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_DQA_CACHE", Path.home() / ".cache" / "lightning_dqa"))


def _cpu_id() -> str:
    """The CPU model and flags (``-march=native`` code runs only where they match)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _build(compiler: str) -> Path:
    """Compile the kernels once per source, flags and CPU; returns the shared library's path."""
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), _cpu_id().encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    target = _cache_dir() / f"bytepath-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(out)], check=True, capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent builders each install a complete file
    return target


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LIGHTNING_DQA_NATIVE", "1") == "0":
        return None, "disabled by LIGHTNING_DQA_NATIVE=0"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None, "no C++ compiler (g++ or $CXX) found"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        return None, f"building the C++ kernels failed: {err} {detail.decode(errors='replace')[:500]}"
    lib.dqa_encode.argtypes = _ENCODE_ARGS
    lib.dqa_encode.restype = _INT
    lib.dqa_decode.argtypes = _DECODE_ARGS
    lib.dqa_decode.restype = _INT
    return lib, "compiled C++ kernels"


def native_library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` when they are disabled or cannot be built (then the numpy path runs)."""
    return _load()[0]


def native_status() -> str:
    """Why the byte path runs natively or not, in words (for benchmarks and logs)."""
    return _load()[1]
