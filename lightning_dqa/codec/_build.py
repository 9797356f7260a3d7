"""How the byte path's C++ kernel is compiled: one place for the flags, used by ``setup.py`` and :mod:`.native`.

This module imports only the standard library, because ``setup.py`` loads it by file path at install time,
before torch or the package can be imported.

The flags are portable on purpose: the shared library built at install time goes into wheels and shared
environments (a cluster's login node builds it, its compute nodes run it), so it must not use ``-march=native``.
On x86-64 the target is the baseline ISA (``-march=x86-64 -mtune=generic``), whatever the compiler's default.
``-ffp-contract=off`` and no fast-math keep the float arithmetic IEEE round-to-nearest like PyTorch's, which is
what makes the kernel's bytes equal the numpy path's. ``-fno-trapping-math`` (the kernel reads no floating-point
exception flags) changes no value; it lets the compiler turn the quantize loop's compare-and-select into vector
code at the baseline ISA (with trapping math assumed, it keeps a branch per value: about 2x slower to store).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LIBRARY_NAME", "SOURCE", "BuildError", "compile_library", "find_compiler", "portable_flags", "source_sha"]

SOURCE = Path(__file__).with_name("_bytepath.cpp")
LIBRARY_NAME = "_bytepath_native.so"  # a plain shared library loaded with ctypes, not a Python extension module
_BASE_FLAGS = (
    "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17", "-pthread",
)  # fmt: skip
_TIMEOUT_S = 300


class BuildError(RuntimeError):
    """The compiler could not be run or failed; the message holds the command and its error output."""


def portable_flags() -> list[str]:
    """Compiler flags for a library that runs on any CPU of this architecture (no ``-march=native``)."""
    flags = list(_BASE_FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=x86-64", "-mtune=generic"]  # the baseline, even where the compiler defaults higher
    return flags


def source_sha(source: Path = SOURCE) -> str:
    """The first 16 hex digits of the source's sha256 (compiled into the library to detect stale builds)."""
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def find_compiler() -> tuple[str | None, str]:
    """``(compiler, "")``, or ``(None, why)``: ``$CXX`` when set, else ``g++`` or ``c++`` on ``PATH``.

    A ``$CXX`` that names no executable is reported as such, not silently replaced by another compiler.
    """
    cxx = os.environ.get("CXX")
    if cxx:
        found = shutil.which(cxx)
        return (found, "") if found else (None, f"$CXX={cxx!r} is not an executable")
    found = shutil.which("g++") or shutil.which("c++")
    return (found, "") if found else (None, "no C++ compiler (g++ or c++ on PATH, or $CXX) found")


def compile_library(
    output: Path, compiler: str, extra_flags: Sequence[str] = (), source: Path = SOURCE, optimize: str = "-O3"
) -> None:
    """Compile ``source`` into the shared library ``output`` with the portable flags (plus ``extra_flags``).

    The library is written next to ``output`` under a temporary name and moved into place, so a reader never
    loads a half-written file.

    Raises:
        BuildError: when the compiler cannot be run or fails (the message holds the command and its stderr).

    """
    flags = [optimize if f == "-O3" else f for f in portable_flags()] + list(extra_flags)
    define = f'-DDQA_SOURCE_SHA="{source_sha(source)}"'
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        out = Path(tmp) / output.name
        cmd = [compiler, *flags, define, str(source), "-o", str(out)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", None) or b""
            detail = stderr.decode(errors="replace").strip()[-2000:]
            raise BuildError(f"compiling the byte path kernel failed: {' '.join(cmd)}: {err} {detail}".strip()) from err
        os.replace(out, output)
