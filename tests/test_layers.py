"""The package's layers: every import points down (docs/architecture.md has the diagram)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top; a module may import its own layer and the ones below it
LAYERS = [
    ("fire_kernels",),
    ("fire_opd.errors",),
    ("fire_opd.parallel",),
    ("fire_opd.algorithm",),
    ("fire_opd.ops",),
    ("fire_opd.train",),
    ("fire_opd.cli", "fire_opd.integrations", "fire_opd.demo"),
]
TOP_LEVEL = ("fire_opd", "fire_opd.__main__")  # the package's front door may import any layer


def _layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py and the architecture page")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] in ("fire_opd", "fire_kernels")]


def _modules():
    for path in sorted([*ROOT.glob("fire_kernels/**/*.py"), *ROOT.glob("fire_opd/**/*.py")]):
        if "assets" in path.parts:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield path, module


def test_imports_point_down_the_layers():
    wrong = []
    for path, module in _modules():
        if module in TOP_LEVEL:
            continue
        own = _layer(module)
        for line, imported in _imports(path):
            if _layer(imported) > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[own][0]}) imports {imported}")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_no_relative_imports_and_kernels_stand_alone():
    for path, module in _modules():
        tree = ast.parse(path.read_text())
        relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{path.relative_to(ROOT)}: relative imports at lines {relative}"
        if module.startswith("fire_kernels"):
            assert all(m.startswith("fire_kernels") for _, m in _imports(path)), f"{module} imports fire_opd"
