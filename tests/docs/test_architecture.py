"""docs/architecture.md stays true: every import in ``ddn_node`` points down its layer
table, and no two modules import each other (directly or round a longer cycle).

The table is read from the document itself, so changing the layering means changing the
document. Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "ddn_node"


def layers() -> dict[str, int]:
    """package -> layer index (0 = top) from the ```layers block of the document."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", doc, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    out: dict[str, int] = {}
    for index, line in enumerate(row for row in block.group(1).splitlines() if row.strip()):
        for name in line.split("#", 1)[0].split():
            out[name] = index
    return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """The layer unit of a module: the first name under ``ddn_node``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module) of every ddn_node import in the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ddn_node"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("ddn_node"):
                continue
            yield node.lineno, target
            for alias in node.names:  # "from ddn_node.store import lifecycle" imports a module
                if (
                    (PACKAGE.parent / (target + "." + alias.name).replace(".", "/"))
                    .with_suffix(".py")
                    .exists()
                ):
                    yield node.lineno, f"{target}.{alias.name}"


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


def test_every_package_is_in_the_table() -> None:
    table = layers()
    packages = {part_of(module_name(p)) for p in all_modules()} - {"", "__main__"}
    assert packages - set(table) == set(), "add these to the layers of docs/architecture.md"
    assert set(table) - packages == set(), "the document names packages that do not exist"


def test_imports_point_down_the_layers() -> None:
    table = layers()
    wrong = []
    for path in all_modules():
        src = part_of(module_name(path))
        if src in ("", "__main__"):
            continue  # the package root and `python -m ddn_node` sit above everything
        for line, target in imports(path):
            dst = part_of(target)
            if dst in ("", src):
                continue
            if table[dst] <= table[src]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({src}) imports {target} ({dst})")
    assert wrong == [], "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    known = {module_name(p) for p in all_modules()}
    for path in all_modules():
        graph[module_name(path)] = {t for _line, t in imports(path) if t in known} - {
            module_name(path)
        }

    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is how packages re-export.
            if node == nxt.rsplit(".", 1)[0] or (
                nxt == node.rsplit(".", 1)[0] and node.startswith(nxt + ".")
            ):
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("pipeline", "store", True),
        ("store", "pipeline", False),
        ("dicom", "notify", False),
        ("web", "web", True),
    ],
)
def test_the_rule_itself(source: str, target: str, allowed: bool) -> None:
    """The checker's rule on known cases, so a broken table cannot pass everything."""
    table = layers()
    assert (source == target or table[target] > table[source]) is allowed
