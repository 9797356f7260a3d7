"""Build step of lightning-dqa: compile the byte path's C++ kernel into the package (metadata: pyproject.toml).

The kernel (``lightning_dqa/codec/_bytepath.cpp``) becomes a plain shared library,
``lightning_dqa/codec/_bytepath_native.so``, loaded with ctypes (``lightning_dqa/codec/native.py``); it is not
a Python extension module. It is declared as an ``Extension`` so that setuptools places it for every kind of
install (the build folder of a wheel, the source tree of ``pip install -e .``) and tags the wheel for this
platform, but :class:`BuildKernel` compiles it with its own command and portable flags
(``lightning_dqa/codec/_build.py``, no ``-march=native``). Without a working C++ compiler the install still
succeeds: the message below is printed and the package falls back to compiling at first use, or to its numpy
path (same bytes, slower), warning once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:  # setuptools >= 70.1 ships bdist_wheel; older ones take it from the wheel package (a build requirement)
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

_HERE = Path(__file__).resolve().parent
_EXT_NAME = "lightning_dqa.codec._bytepath_native"


def _build_module() -> Any:
    """``lightning_dqa/codec/_build.py`` loaded by path (the package itself needs torch, absent at build time)."""
    spec = importlib.util.spec_from_file_location("_dqa_build", _HERE / "lightning_dqa" / "codec" / "_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernel(build_ext):
    """Compile ``_bytepath.cpp`` into ``_bytepath_native.so``; a failed compile warns instead of failing."""

    def get_ext_filename(self, fullname: str) -> str:
        """``lightning_dqa/codec/_bytepath_native.so``: no Python ABI suffix (ctypes loads it by this name)."""
        if fullname in (_EXT_NAME, _EXT_NAME.rsplit(".", 1)[1]):  # distutils also asks with the last part only
            return str(Path(*fullname.split("."))) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        """Compile with the portable flags of ``_build.py``; print why and go on when that fails."""
        if ext.name != _EXT_NAME:
            super().build_extension(ext)
            return
        build = _build_module()
        output = Path(self.get_ext_fullpath(ext.name))
        compiler, why = build.find_compiler()
        try:
            if compiler is None:
                raise build.BuildError(why)
            build.compile_library(output, compiler)
        except build.BuildError as err:
            output.unlink(missing_ok=True)
            print(
                "WARNING: lightning-dqa: the byte path's C++ kernel was not built at install "
                f"({err}). The package works without it: it compiles the kernel at first use if a compiler "
                "appears, and otherwise runs its numpy path (same bytes, about 13x slower) with a warning. "
                "Install g++ (or set CXX) and reinstall to bundle it.",
                file=sys.stderr,
            )
            return
        print(f"lightning-dqa: built the byte path's C++ kernel {output} ({compiler})", file=sys.stderr)

    def copy_extensions_to_source(self) -> None:
        """Copy what was built into the source tree (editable installs); skip a kernel that was not built."""
        build_py = self.get_finalized_command("build_py")
        self.extensions = [
            ext for ext in self.extensions if Path(self._get_inplace_equivalent(build_py, ext)[1]).exists()
        ]
        super().copy_extensions_to_source()


class PlatformWheel(bdist_wheel):
    """Tag the wheel ``py3-none-<platform>``: the library depends on the platform, not on the Python version."""

    def get_tag(self) -> tuple[str, str, str]:
        """The platform tag of the build, any Python 3."""
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    ext_modules=[Extension(_EXT_NAME, sources=["lightning_dqa/codec/_bytepath.cpp"], optional=True)],
    cmdclass={"build_ext": BuildKernel, "bdist_wheel": PlatformWheel},
)
