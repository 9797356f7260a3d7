"""The package's folders are its layers, and imports point one way: core <- codec <- deploy <- calibration <-
integration <- demos, then the package front (``lightning_dqa/__init__.py``).

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``, absolute or relative. Only
``integration`` and ``demos`` may import Lightning. A user who only deploys imports no calibration code.
"""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lightning_dqa
from lightning_dqa import _deprecated

PACKAGE = Path(lightning_dqa.__file__).parent
LAYERS = ("core", "codec", "deploy", "calibration", "integration", "demos")
FRONT = len(LAYERS)  # lightning_dqa/__init__.py and its deprecation shim: above every layer
LIGHTNING = ("lightning", "pytorch_lightning")
MAY_IMPORT_LIGHTNING = {LAYERS.index("integration"), LAYERS.index("demos"), FRONT}


def layer_of(module: str) -> int:
    """The layer index of a dotted module name inside the package (the front for the package itself)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else FRONT


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``tree``, relative ones resolved against ``module``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((node.lineno, base))
            if base.split(".")[0] == "lightning_dqa":  # from lightning_dqa.x import submodule
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name in LAYERS]
    return out


def violations(root: Path) -> list[str]:
    """Every import under ``root`` (a copy of the package) that points to a higher layer, or to Lightning."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        own = layer_of(module)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            top = target.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line}"
            if top == "lightning_dqa" and layer_of(target) > own:
                found.append(f"{where}: {module} ({_name(own)}) imports {target} ({_name(layer_of(target))})")
            elif top in LIGHTNING and own not in MAY_IMPORT_LIGHTNING:
                found.append(f"{where}: {module} ({_name(own)}) imports {target}; only integration may")
    return found


def _name(layer: int) -> str:
    return LAYERS[layer] if layer < len(LAYERS) else "package front"


def test_every_import_points_down_the_layers():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("file", "line", "expected"),
    [
        ("core/config.py", "\ndef _f():\n    from lightning_dqa.calibration.engine import run\n", "(core) imports"),
        ("codec/blob.py", "\nif TYPE_CHECKING:\n    from lightning_dqa.deploy import compressed\n", "(codec) imports"),
        ("deploy/compressed.py", "\nfrom ..calibration import engine\n", "(deploy) imports lightning_dqa.calibration"),
        ("calibration/engine.py", "\nimport lightning_dqa.integration.callback\n", "(calibration) imports"),
        ("core/attach.py", "\nfrom lightning_dqa import DQACallback\n", "imports lightning_dqa (package front)"),
        ("deploy/meter.py", "\ndef _f():\n    import lightning.pytorch\n", "only integration may"),
    ],
)
def test_the_rule_fails_on_an_import_that_points_the_wrong_way(tmp_path, file, line, expected):
    copy = tmp_path / "lightning_dqa"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with open(copy / file, "a") as f:
        f.write(line)
    found = violations(copy)
    assert len(found) == 1 and expected in found[0] and found[0].startswith(f"lightning_dqa/{file}:"), found


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_user_who_only_deploys_imports_no_calibration_code_and_no_lightning(tmp_path):
    model = "torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))"
    path = tmp_path / "model.dqa.json"
    make = (
        "import torch\nfrom lightning_dqa import DQAConfig, calibrate, export_artifact, prepare\n"
        f"torch.manual_seed(0)\nm = {model}\nc = DQAConfig(bits=4, ranking='energy', first_layer_bits=None)\n"
        "prepare(m, c)\ncalibrate(m, c, [torch.randn(8, 3, 8, 8)], forward_fn=lambda m, b: m(b))\n"
        f"export_artifact(m, {str(path)!r}, c)"
    )
    assert any(m.startswith("lightning_dqa.calibration") for m in _loaded_after(make))
    deploy = (
        "import torch\nfrom lightning_dqa import apply_artifact, run_compressed\n"
        f"m = {model}.eval()\napply_artifact(m, {str(path)!r})\n"
        "out, report = run_compressed(m, torch.randn(1, 3, 8, 8))\nassert report.stored.nbytes > 0"
    )
    loaded = _loaded_after(deploy)
    assert [m for m in loaded if m.startswith("lightning_dqa.calibration")] == []
    assert [m for m in loaded if m.split(".")[0] in LIGHTNING] == []


def test_the_public_surface_is_what_all_lists():
    assert sorted(lightning_dqa.__all__) == sorted(lightning_dqa._PUBLIC)
    for name in lightning_dqa.__all__:
        assert getattr(lightning_dqa, name).__name__ == name


@pytest.mark.parametrize("old", sorted(set(_deprecated.MODULES) - {"lightning_checkpoint"}))
def test_old_module_paths_warn_once_and_resolve_to_the_same_objects(old):
    for key in [k for k in sys.modules if k == f"lightning_dqa.{old}" or k.startswith(f"lightning_dqa.{old}.")]:
        del sys.modules[key]
    with pytest.warns(DeprecationWarning, match=rf"lightning_dqa\.{old} moved to {_deprecated.MODULES[old][0]}"):
        alias = importlib.import_module(f"lightning_dqa.{old}")
    target = importlib.import_module(_deprecated.MODULES[old][0])
    names = getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in names:
            assert getattr(alias, name) is getattr(target, name)


def test_the_checkpoint_instantiator_of_0_1_resolves_silently():
    sys.modules.pop("lightning_dqa.lightning_checkpoint", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lightning_dqa.lightning_checkpoint import instantiate_quantized  # what 0.1 checkpoints name
    from lightning_dqa.integration.checkpoint_hooks import INSTANTIATORS
    from lightning_dqa.integration.checkpoint_hooks import instantiate_quantized as current

    assert instantiate_quantized is current
    assert "lightning_dqa.lightning_checkpoint.instantiate_quantized" in INSTANTIATORS
