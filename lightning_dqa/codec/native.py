"""The byte path's C++ kernel (``_bytepath.cpp``): found, checked and bound with ctypes.

Why a small C++ file and not plain torch ops, ``torch.compile`` or numba: storing an activation is one walk over
it that quantizes, shifts, bit-packs the main codes and Huffman-codes the errors, and restoring is the reverse
walk; the bit writer and the Huffman decoder are sequential, data-dependent loops that tensor libraries express
only as many full-size passes (see ``examples/bench_bytepath.py`` for the side-by-side measurement). A C++ loop
does it in one pass with a few bytes of state.

Where the kernel comes from, first found wins:

1. **bundled**: ``_bytepath_native.so`` next to this file, built by ``setup.py`` at install time (``pip install``,
   ``pip install -e .``, ``pip wheel .``) with portable flags (:mod:`._build`). Skipped when it was built from
   another ``_bytepath.cpp`` than the one beside it (an edited source tree).
2. **compiled at first use**, for source trees without that build: once per machine into ``$LIGHTNING_DQA_CACHE``
   (default ``~/.cache/lightning_dqa``), named by a hash of the source and the flags, under a file lock so that
   concurrent processes (DDP ranks) compile it once while the others wait, then load it.
3. otherwise the **numpy path** (same bytes, about 13x slower), with one ``UserWarning`` per process saying why;
   :func:`native_status` says which of the three runs.

``LIGHTNING_DQA_NATIVE=0`` disables the kernel; ``LIGHTNING_DQA_NATIVE=compile`` ignores the bundled build (tests
use it to exercise step 2 and 3).

The binding is checked: the library reports its exported signatures (``dqa_abi()``, derived by the C++
compiler from the functions' own types); the ctypes argument lists are built from that report, and only after
it equals :data:`SIGNATURES`, the signatures the Python callers are written for. A mismatch raises a
``RuntimeError`` naming the function and both signatures instead of passing arguments the C++ side reads
differently (memory corruption); the loader then falls back to the numpy path with the warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from lightning_dqa.codec._build import (
    LIBRARY_NAME,
    SOURCE,
    BuildError,
    compile_library,
    find_compiler,
    portable_flags,
    source_sha,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock; the atomic rename still keeps every file whole
    fcntl = None  # type: ignore[assignment]

__all__ = ["ABI_VERSION", "SIGNATURES", "NativeKernels", "bind", "native_library", "native_status", "parse_abi"]

#: Bumped together with ``DQA_ABI_VERSION`` in ``_bytepath.cpp`` when an argument's meaning changes.
ABI_VERSION = 1
#: The kernels' signatures as ``bytepath.py`` calls them, in ``dqa_abi()``'s notation (``f32*``: a float32
#: buffer's address, ``i64``: an int64, ...). The one Python-side declaration; the ctypes lists derive from it.
SIGNATURES: dict[str, str] = {
    "dqa_encode": "(f32*,i64,i64,i64,f32*,f32*,u8*,i32,i32,i32,u32*,u8*,i64,u8*,u8*,i64*,i64*,i32)->i32",
    "dqa_decode": "(u8*,i64,u8*,i64,i64,i64*,i64,i32*,u8*,i32,i64,i64,i64,f32*,f32*,u8*,i32,i32,i32,f32*,i32)->i32",
}
_CTYPES: dict[str, Any] = {"i32": ctypes.c_int32, "i64": ctypes.c_int64}
_FALLBACK_NOTE = "the byte path runs its numpy path instead (same bytes, about 13x slower)"


class NativeKernels:
    """The bound kernels of one shared library: ``dqa_encode`` and ``dqa_decode`` with checked arity.

    ctypes passes surplus arguments on silently (C varargs rules), so each call also checks the count.
    """

    def __init__(self, path: Path, functions: dict[str, Callable[..., int]]) -> None:
        self.path = path
        self.dqa_encode = functions["dqa_encode"]
        self.dqa_decode = functions["dqa_decode"]


def parse_abi(text: str) -> tuple[int, dict[str, tuple[tuple[str, ...], str]]]:
    """``(version, {name: (argument types, return type)})`` from ``dqa_abi()``'s ``v1;name(a,b)->r;...``.

    Raises:
        RuntimeError: for text not in that form.

    """
    head, *entries = text.split(";")
    if not head.startswith("v") or not head[1:].isdigit():
        raise RuntimeError(f"dqa_abi(): expected 'v<version>;name(args)->type;...', got {text!r}")
    functions: dict[str, tuple[tuple[str, ...], str]] = {}
    for entry in entries:
        name, sep, rest = entry.partition("(")
        args, arrow, ret = rest.partition(")->")
        if not (sep and arrow and name and ret):
            raise RuntimeError(f"dqa_abi(): expected entries 'name(args)->type', got {entry!r} in {text!r}")
        functions[name] = (tuple(args.split(",")) if args else (), ret)
    return int(head[1:]), functions


def _ctype(name: str, function: str) -> Any:
    if name.endswith("*"):
        return ctypes.c_void_p
    if name not in _CTYPES:
        raise RuntimeError(f"{function}: the library reports argument type {name!r}, not one of i32, i64 or T*")
    return _CTYPES[name]


def _checked(fn: Any, name: str, signature: str, arity: int) -> Callable[..., int]:
    def call(*args: Any) -> int:
        if len(args) != arity:
            raise TypeError(f"{name}: expected {arity} arguments {signature}, got {len(args)}")
        return int(fn(*args))

    return call


def bind(path: Path, expected: dict[str, str] | None = None, version: int = ABI_VERSION) -> NativeKernels:
    """Load the library at ``path`` and bind its kernels after checking their signatures.

    Args:
        path: the shared library.
        expected: ``{name: "(args)->ret"}`` the callers use; :data:`SIGNATURES` when ``None``.
        version: the ABI version the callers use.

    Raises:
        OSError: when the library cannot be loaded.
        RuntimeError: when it reports no ABI, another ABI version, or a signature other than ``expected``
            (the message names the function and both signatures).

    """
    expected = SIGNATURES if expected is None else expected
    lib = ctypes.CDLL(str(path))
    if not hasattr(lib, "dqa_abi"):
        raise RuntimeError(f"{path}: exports no dqa_abi(), so its signatures cannot be checked (an older build)")
    lib.dqa_abi.restype = ctypes.c_char_p
    lib.dqa_abi.argtypes = []
    got_version, reported = parse_abi(lib.dqa_abi().decode())
    if got_version != version:
        raise RuntimeError(
            f"{path}: dqa_abi() reports ABI version {got_version}, lightning_dqa calls version {version}"
        )
    functions: dict[str, Callable[..., int]] = {}
    for name, want in expected.items():
        if name not in reported:
            raise RuntimeError(f"{name}: the library {path} does not report it (it reports {sorted(reported)})")
        args, ret = reported[name]
        got = f"({','.join(args)})->{ret}"
        if got != want:
            raise RuntimeError(
                f"{name}: the library's signature {got} differs from the one lightning_dqa calls {want} "
                f"(library {path}; rebuild it: pip install -e . or delete the kernel cache)"
            )
        fn = getattr(lib, name)
        fn.argtypes = [_ctype(a, name) for a in args]
        fn.restype = _ctype(ret, name)
        functions[name] = _checked(fn, name, want, len(args))
    return NativeKernels(Path(path), functions)


def _cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_DQA_CACHE", Path.home() / ".cache" / "lightning_dqa"))


def _bundled() -> tuple[NativeKernels | None, str]:
    """The library built at install time, or ``(None, why not)``."""
    path = Path(__file__).with_name(LIBRARY_NAME)
    if not path.exists():
        return None, f"no bundled kernel ({path.name} was not built at install)"
    try:
        if SOURCE.exists():  # an edited source tree: its kernel is compiled at first use instead
            built_from = ctypes.CDLL(str(path)).dqa_source_sha
            built_from.restype = ctypes.c_char_p
            if built_from().decode() != source_sha():
                return None, f"the bundled {path.name} was built from another {SOURCE.name} (stale)"
        return bind(path), "bundled kernel (built at install)"
    except (OSError, RuntimeError, AttributeError) as err:
        return None, f"the bundled kernel is unusable: {err}"


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (one compiling process per machine; the others wait)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _compiled_at_first_use() -> tuple[NativeKernels | None, str]:
    """The library compiled into the cache (now, or by an earlier process), or ``(None, why not)``."""
    try:
        key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(portable_flags()).encode()])).hexdigest()
        target = _cache_dir() / f"bytepath-portable-{key[:16]}.so"
        if not target.exists():
            compiler, why = find_compiler()
            if compiler is None:
                return None, why
            with _locked(target.with_suffix(".lock")):
                if not target.exists():  # another process may have built it while this one waited
                    compile_library(target, compiler)
        return bind(target), f"compiled at first use in {target}"
    except BuildError as err:
        return None, str(err)
    except (OSError, RuntimeError) as err:
        return None, f"the kernel compiled at first use is unusable: {err}"


@cache
def _load() -> tuple[NativeKernels | None, str]:
    mode = os.environ.get("LIGHTNING_DQA_NATIVE", "1")
    if mode not in ("0", "1", "compile"):
        raise ValueError(f"Expected LIGHTNING_DQA_NATIVE to be 0, 1 or compile, got {mode!r}")
    if mode == "0":
        reason = "disabled by LIGHTNING_DQA_NATIVE=0"
    else:
        lib, bundled_why = (
            _bundled() if mode == "1" else (None, "bundled kernel ignored (LIGHTNING_DQA_NATIVE=compile)")
        )
        if lib is not None:
            return lib, bundled_why
        lib, compile_why = _compiled_at_first_use()
        if lib is not None:
            return lib, compile_why
        reason = f"{bundled_why}; {compile_why}"
    warnings.warn(f"lightning_dqa: C++ kernel unavailable ({reason}): {_FALLBACK_NOTE}", UserWarning, stacklevel=3)
    return None, f"numpy fallback: {reason}"


def native_library() -> NativeKernels | None:
    """The bound kernels, or ``None`` when they are disabled or unavailable (then the numpy path runs).

    The first call finds (or compiles) the library; a fallback warns once per process.
    """
    return _load()[0]


def native_status() -> str:
    """Which byte path runs, in words (for logs, benchmarks and the calibration summary).

    One of ``"bundled kernel (built at install)"``, ``"compiled at first use in <path>"`` or
    ``"numpy fallback: <reason>"``.
    """
    return _load()[1]
