"""The byte path's C++ kernel: where it comes from, its checked binding, the one fallback warning, device routing."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from native_required import require_native_kernel

from lightning_dqa.codec import HuffmanCodebook, bytepath, native
from lightning_dqa.codec._build import SOURCE, compile_library, find_compiler
from lightning_dqa.codec.bytepath import decode_values, encode_values
from lightning_dqa.codec.native import SIGNATURES, NativeKernels, bind, parse_abi
from lightning_dqa.core import functional as F
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes

# The layer and activation both the test process and its subprocesses build (same seed, same blob).
CASE = textwrap.dedent(
    """
    import torch
    from lightning_dqa.core import functional as F
    from lightning_dqa.core.quantizers import ActivationQuantizer

    def make_case():
        gen = torch.Generator().manual_seed(7)
        q = ActivationQuantizer(6, bits=3, extra_bits=3, scale_mode="static", name="conv")
        x = torch.randn(4, 6, 9, 9, generator=gen).relu()
        q.set_static_scale(F.scale_from_max(F.channel_absmax(x), 3, True))
        q.important[[1, 4]] = True
        q.error_counts.copy_(torch.arange(8, 0, -1))
        return q, x
    """
)


def make_case() -> tuple:
    scope: dict = {}
    exec(CASE, scope)
    return scope["make_case"]()


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_DQA_") and k not in ("CXX", "CC")}
    return {**env, **extra}


def test_the_kernel_says_where_it_comes_from(native_kernel: NativeKernels) -> None:
    status = native.native_status()
    assert status == "bundled kernel (built at install)" or status.startswith("compiled at first use in ")
    assert native_kernel.path.exists()


def test_a_drifted_python_signature_is_refused(native_kernel: NativeKernels) -> None:
    drifted = {**SIGNATURES, "dqa_encode": SIGNATURES["dqa_encode"].replace("(f32*,i64,", "(f32*,", 1)}
    with pytest.raises(RuntimeError, match=r"dqa_encode: the library's signature \(f32\*,i64,i64,i64,") as err:
        bind(native_kernel.path, expected=drifted)
    assert drifted["dqa_encode"] in str(err.value) and SIGNATURES["dqa_encode"] in str(err.value)
    with pytest.raises(RuntimeError, match="ABI version 1, lightning_dqa calls version 2"):
        bind(native_kernel.path, version=2)


def test_a_drifted_cpp_signature_is_refused(tmp_path: Path) -> None:
    """The library's report comes from the C++ types: changing a parameter's type changes what it reports."""
    compiler, why = find_compiler()
    if compiler is None:
        pytest.skip(why)
    text = SOURCE.read_text()
    assert text.count("int64_t* err_bits, int threads)") == 1
    source = tmp_path / "_bytepath.cpp"
    source.write_text(text.replace("int64_t* err_bits, int threads)", "int64_t* err_bits, int64_t threads)"))
    compile_library(tmp_path / "drifted.so", compiler, source=source, optimize="-O0")
    with pytest.raises(RuntimeError, match=r"dqa_encode: .*i64\*,i64\)->i32 differs from .*i64\*,i32\)->i32"):
        bind(tmp_path / "drifted.so")


def test_the_bound_kernels_check_the_number_of_arguments(native_kernel: NativeKernels) -> None:
    with pytest.raises(TypeError, match=r"dqa_decode: expected 21 arguments \(u8\*,.*got 3"):
        native_kernel.dqa_decode(0, 0, 0)


def test_abi_text_that_is_not_a_signature_list_is_refused() -> None:
    assert parse_abi("v1;f(i32,u8*)->i64;g()->i32") == (1, {"f": (("i32", "u8*"), "i64"), "g": ((), "i32")})
    for bad in ("1;f(i32)->i32", "v1;f(i32)", "v1;(i32)->i32"):
        with pytest.raises(RuntimeError, match="dqa_abi"):
            parse_abi(bad)


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The loader re-run from scratch (own cache folder), and restored for the other tests afterwards."""
    monkeypatch.setenv("LIGHTNING_DQA_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    yield
    native._load.cache_clear()


def test_a_drifted_signature_falls_back_to_numpy_with_one_warning(
    native_kernel: object, fresh_loader: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Needs a kernel to drift from: skips without one (a machine without a compiler), fails in CI."""
    monkeypatch.setitem(SIGNATURES, "dqa_decode", SIGNATURES["dqa_decode"].replace("->i32", "->i64"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.native_library() is None and native.native_library() is None
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == [
        f"lightning_dqa: C++ kernel unavailable ({native.native_status().removeprefix('numpy fallback: ')}): "
        "the byte path runs its numpy path instead (same bytes, about 13x slower)"
    ]
    assert "dqa_decode: the library's signature" in native.native_status()


def test_a_failing_compiler_falls_back_with_its_error(fresh_loader: None, monkeypatch: pytest.MonkeyPatch) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' program to stand for a failing compiler")
    monkeypatch.setenv("LIGHTNING_DQA_NATIVE", "compile")
    monkeypatch.setenv("CXX", false)
    with pytest.warns(UserWarning, match="compiling the byte path kernel failed: .*false"):
        assert native.native_library() is None
    assert native.native_status().startswith("numpy fallback: bundled kernel ignored (LIGHTNING_DQA_NATIVE=compile)")


def test_an_unknown_native_setting_is_refused(fresh_loader: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_DQA_NATIVE", "yes")
    with pytest.raises(ValueError, match="LIGHTNING_DQA_NATIVE to be 0, 1 or compile, got 'yes'"):
        native.native_library()


NO_COMPILER_CHILD = """
import json, sys, warnings
warnings.simplefilter("always")
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes
from lightning_dqa.codec.native import native_library, native_status
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q, x = make_case()
    blobs = [quantizer_to_bytes(q, x) for _ in range(2)]
    values = bytes_to_values(q, blobs[0])
    native_status()
with torch.no_grad():
    same = bool(torch.equal(values, q(x) + 0.0))
warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "C++ kernel" in str(w.message)]
json.dump({"blobs": [b.hex() for b in blobs], "values": same, "warnings": warned, "status": native_status(),
           "lib": native_library() is None}, sys.stdout)
"""


def test_without_a_compiler_the_package_warns_once_and_writes_the_same_bytes(
    native_kernel: NativeKernels, tmp_path: Path
) -> None:
    """No compiler (``$CXX`` missing, none on ``PATH``), no bundled kernel, an empty cache: the numpy path."""
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if not any(
        (Path(d) / tool).exists() for tool in ("g++", "c++", "gcc", "cc", "clang++")
    )]  # fmt: skip
    env = _env(
        CXX="/nonexistent", CC="/nonexistent", PATH=os.pathsep.join(path), LIGHTNING_DQA_NATIVE="compile",
        LIGHTNING_DQA_CACHE=str(tmp_path / "cache"),
    )  # fmt: skip
    proc = _run(CASE + NO_COMPILER_CHILD, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    q, x = make_case()
    assert got["blobs"] == [quantizer_to_bytes(q, x).hex()] * 2 and got["values"] and got["lib"]
    assert len(got["warnings"]) == 1, got["warnings"]
    assert "$CXX='/nonexistent' is not an executable" in got["warnings"][0]
    assert got["status"].startswith("numpy fallback: bundled kernel ignored (LIGHTNING_DQA_NATIVE=compile); ")


@pytest.mark.slow
def test_concurrent_processes_compile_the_kernel_once(tmp_path: Path) -> None:
    """Two processes (DDP ranks) start together without a bundled kernel: one compiles, the others wait."""
    compiler, why = find_compiler()
    if compiler is None:
        pytest.skip(why)
    count = tmp_path / "compiles"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho x >> "{count}"\nsleep 2\nexec "{compiler}" "$@"\n')
    wrapper.chmod(0o755)
    env = _env(CXX=str(wrapper), LIGHTNING_DQA_NATIVE="compile", LIGHTNING_DQA_CACHE=str(tmp_path / "cache"))
    code = "from lightning_dqa.codec.native import native_status; print(native_status())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    statuses = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert count.read_text().count("x") == 1
    assert len(set(statuses)) == 1 and statuses[0].startswith(f"compiled at first use in {tmp_path / 'cache'}")


def _coding_args(x: torch.Tensor) -> dict:
    channels = x.shape[1]
    return {
        "scale_n": F.scale_from_max(F.channel_absmax(x) + 0.01, 3, False), "important": torch.arange(channels) % 3 == 0,
        "bits": 3, "extra_bits": 3, "signed": False, "channel_dim": 1, "chunk_size": 16,
        "codebook": HuffmanCodebook.from_counts([9, 5, 3, 2, 1, 1, 1, 1]),
    }  # fmt: skip


def test_a_device_tensor_is_coded_natively_from_one_host_copy(
    native_kernel: NativeKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routing without a GPU: a meta tensor stands for the device tensor, ``_to_host`` for its copy."""
    x = torch.rand(2, 6, 5, 5)
    args = _coding_args(x)
    want = encode_values(x, **args)
    copies: list[str] = []

    def to_host(t: torch.Tensor) -> torch.Tensor:
        copies.append(t.device.type)
        return x

    def no_reference(*_: object, **__: object) -> None:
        raise AssertionError("the numpy path ran")

    monkeypatch.setattr(bytepath, "_to_host", to_host)
    monkeypatch.setattr(bytepath, "_encode_reference", no_reference)
    monkeypatch.setattr(bytepath, "_decode_reference", no_reference)
    got = encode_values(x.to("meta"), **args)
    assert copies == ["meta"]
    assert np.array_equal(got.main, want.main) and np.array_equal(got.error, want.error)
    assert got.error_bits == want.error_bits
    real_to_device = bytepath._to_device
    moved: list[torch.Tensor] = []

    def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
        moved.append(t)
        return real_to_device(t, device)

    monkeypatch.setattr(bytepath, "_to_device", to_device)
    out = decode_values(got, tuple(x.shape), **args, device="meta")
    assert out.device.type == "meta" and len(moved) == 1 and moved[0].device.type == "cpu"
    assert torch.equal(moved[0], decode_values(got, tuple(x.shape), **args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (checks CUDA bytes and values = CPU)")
def test_cuda_tensors_give_the_cpu_bytes_and_values(native_kernel: NativeKernels) -> None:
    x = torch.rand(3, 6, 7, 7)
    args = _coding_args(x)
    cpu, gpu = encode_values(x, **args), encode_values(x.cuda(), **{**args, "scale_n": args["scale_n"].cuda()})
    assert np.array_equal(cpu.main, gpu.main) and np.array_equal(cpu.error, gpu.error)
    assert np.array_equal(cpu.offsets, gpu.offsets) and cpu.error_bits == gpu.error_bits
    out = decode_values(cpu, tuple(x.shape), **args, device="cuda")
    assert out.device.type == "cuda" and torch.equal(out.cpu(), decode_values(cpu, tuple(x.shape), **args))
    q, x = make_case()
    q_gpu = copy.deepcopy(q).cuda()
    blob = quantizer_to_bytes(q, x)
    assert quantizer_to_bytes(q_gpu, x.cuda()) == blob
    values = bytes_to_values(q_gpu, blob)
    assert values.device.type == "cuda" and torch.equal(values.cpu(), bytes_to_values(q, blob))


@pytest.mark.parametrize(
    ("env", "required"),
    [({}, False), ({"CI": "true"}, True), ({"CI": "false"}, False), ({"LIGHTNING_DQA_REQUIRE_NATIVE": "1"}, True)],
)
def test_a_missing_kernel_fails_where_required_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, env: dict, required: bool
) -> None:
    for name in ("CI", "LIGHTNING_DQA_REQUIRE_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(native, "_load", lambda: (None, "numpy fallback: why"))
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match="no native kernel: numpy fallback: why"):
        require_native_kernel()


def test_in_ci_the_kernel_tests_fail_without_the_kernel(tmp_path: Path) -> None:
    """End to end: a test using the ``native_kernel`` fixture, run by pytest with ``CI=true`` and no kernel."""
    tests = Path(__file__).parents[1]  # tests/, where conftest.py and native_required.py are
    for name in ("conftest.py", "native_required.py"):
        shutil.copy(tests / name, tmp_path / name)
    (tmp_path / "test_child.py").write_text("def test_needs_kernel(native_kernel):\n    pass\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_child.py"],
        env=_env(LIGHTNING_DQA_NATIVE="0", CI="true"), cwd=tmp_path, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "1 error" in proc.stdout, proc.stdout + proc.stderr
    assert "no native kernel: numpy fallback: disabled by LIGHTNING_DQA_NATIVE=0 (required: CI" in proc.stdout
