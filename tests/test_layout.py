"""The package reads as the pipeline and nothing imports upward: detect -> decide ->
enforce, with the service and the command line at the edges, and the lab outside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "floodd"
# Each layer may import itself and the layers before it, never one after it.
LAYERS = ["", "detect", "decide", "enforce", "service", "cli"]


def layer(module: str) -> int:
    """The layer of ``floodd.X...``: X's, or the bottom for floodd's top-level modules
    (configuration, errors, query types, running commands); ``python -m floodd`` is the
    command line."""
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return LAYERS.index("cli")
    return LAYERS.index(parts[1]) if parts[1:2] and parts[1] in LAYERS[1:] else 0


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE.parent / node.module.replace(".", "/") / alias.name
                          ).with_suffix(".py").exists()}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_nothing_imports_upward(path: Path) -> None:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if name.endswith(".__init__"):
        name = name.removesuffix(".__init__")
    own = layer(name)
    for target in imports(path):
        assert not target.startswith("lab"), f"{name} imports {target}: the lab is not shipped"
        if target.startswith("floodd.") and target != "floodd.__version__":
            assert layer(target) <= own, f"{name} imports {target}, a later stage"


def test_every_layer_is_a_folder() -> None:
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(LAYERS[1:])
