"""The code's layout as README's "How the code is laid out" states it, checked from the source.

* imports point one way: ``pipeline`` (the engine) imports no domain package; ``knowledge``,
  ``vision`` and ``speech`` import neither each other nor ``fusion``;
* no two modules import each other, directly or through a cycle (imports inside functions count:
  a lazy import is still a dependency);
* no module is longer than about 500 lines, and no block of six lines is repeated between two
  model files.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "knowledge", "vision", "speech", "fusion")
DOMAIN = ("knowledge", "vision", "speech", "fusion")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the five packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` of every import of a stele module in ``path``, at any depth;
    ``from a import b`` names ``a.b`` when that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a function: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for name, path in known.items():
        for target, line in imports(name, path, known):
            g.add_edge(name, target, where=f"{path.relative_to(ROOT)}:{line}")
    return g


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_import_reader_sees_imports_at_any_depth(graph: nx.DiGraph) -> None:
    assert graph.has_edge("fusion.pretrain.stage", "pipeline.train")      # module level
    assert graph.has_edge("fusion.pretrain.stage", "fusion.pretrain.loop")  # inside a function
    assert graph.has_edge("knowledge.stages.embed", "knowledge.embed")      # relative, in a function


def test_the_engine_imports_no_domain_package(graph: nx.DiGraph) -> None:
    bad = [f"{d['where']}: {a} imports {b}" for a, b, d in graph.edges(data=True)
           if _top(a) == "pipeline" and _top(b) in DOMAIN]
    assert not bad, "\n".join(bad)


def test_knowledge_vision_and_speech_import_neither_each_other_nor_fusion(graph: nx.DiGraph) -> None:
    bad = [f"{d['where']}: {a} imports {b}" for a, b, d in graph.edges(data=True)
           if _top(a) in ("knowledge", "vision", "speech") and _top(b) in DOMAIN
           and _top(b) != _top(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph: nx.DiGraph) -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    detail = []
    for c in cycles:
        sub = graph.subgraph(c)
        detail.append(" -> ".join(c) + "\n    " + "\n    ".join(
            f"{d['where']}: {a} imports {b}" for a, b, d in sub.edges(data=True)))
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_modules_stay_readable_in_size() -> None:
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by role): {long}"


def _windows(path: Path, size: int = 6) -> dict[tuple[str, ...], int]:
    """Each run of ``size`` consecutive code lines (stripped; blank lines, comments and lines
    too short to mean anything alone left out) -> the line it starts at."""
    lines = [(no, line.strip()) for no, line in enumerate(path.read_text().splitlines(), 1)]
    code = [(no, s) for no, s in lines if len(s) > 3 and not s.startswith("#")]
    return {tuple(s for _, s in code[i:i + size]): code[i][0] for i in range(len(code) - size + 1)}


def test_no_block_is_repeated_between_model_files() -> None:
    files = sorted((ROOT / "fusion" / "models").glob("*.py"))
    seen: dict[tuple[str, ...], str] = {}
    repeated = []
    for path in files:
        for block, line in _windows(path).items():
            where = f"{path.relative_to(ROOT)}:{line}"
            if block in seen and seen[block].split(":")[0] != where.split(":")[0]:
                repeated.append(f"{where} repeats {seen[block]}: {block[0]!r} ...")
            seen.setdefault(block, where)
    assert not repeated, "\n".join(repeated)
