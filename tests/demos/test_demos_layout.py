"""The core package never imports the demos, and the demos expose what the examples and configs name."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_dqa
import lightning_dqa.demos as demos

PACKAGE = Path(lightning_dqa.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_do_not_import_demos() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if "demos" not in p.relative_to(PACKAGE).parts]
    assert core, PACKAGE
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(n for n in _imported_modules(p) if "demos" in n.split(".")) for p in core
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_demos_reexport_their_public_names() -> None:
    for name in demos.__all__:
        assert getattr(demos, name) is not None, name
    assert {"ImageClassifier", "SegmentationModel", "CIFAR10DataModule", "CamVidDataModule", "build_model"} <= set(
        demos.__all__
    )
