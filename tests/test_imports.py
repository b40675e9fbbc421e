"""No import cycle inside ``batchgen/``, counting imports inside functions.

A cycle that works today only because one side imports lazily still ties the two modules
together: neither can be read, tested or moved alone. The graph is built from the source with
``ast`` (nothing is imported), with one node per module and one edge per ``import`` statement
anywhere in it that names another batchgen module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "batchgen"


def module_names(root: Path) -> dict[str, Path]:
    """``batchgen.x.y`` -> its file, for every module and package under ``root``."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The batchgen modules that ``name`` imports anywhere in its file.

    ``from P import x`` counts as an import of ``P.x`` where that is a module (a submodule
    import), else of ``P``. Relative imports are resolved against the module's package.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            # `import batchgen.a.b` names the module b; a name that is no module is an attribute of its parent.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None if it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the batchgen modules it imports, over every file under ``root``."""
    modules = module_names(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_batchgen_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "batchgen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("import os\nfrom batchgen.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("def g():\n    import batchgen.a\n")
    graph = import_graph(pkg)
    assert graph["batchgen.a"] == {"batchgen.sub.b"}
    assert graph["batchgen.sub"] == {"batchgen.sub.b"}
    assert graph["batchgen.sub.b"] == {"batchgen.c"}
    assert find_cycle(graph) == ["batchgen.a", "batchgen.sub.b", "batchgen.c", "batchgen.a"]
    (pkg / "c.py").write_text("def g():\n    import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_the_graph_holds_known_edges() -> None:
    graph = import_graph()
    assert "batchgen.engine.request" in graph["batchgen.engine.sampler"]
    assert "batchgen.pipeline.spec" in graph["batchgen.cli"]  # function-level in cli.py


def test_production_code_reaches_the_fault_hook_only_at_its_seam() -> None:
    """``batchgen.pipeline.faults`` is a test hook: one marked function imports it
    (``replica.load_test_hooks``), and only when the hook is set; no other module does."""
    modules = module_names(PACKAGE)
    hook = "batchgen.pipeline.faults"
    importers = sorted(name for name, path in modules.items() if name != hook
                       and hook in imports_of(name, path, set(modules)))
    assert importers == ["batchgen.pipeline.replica"], importers
    tree = ast.parse(modules["batchgen.pipeline.replica"].read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if "faults" in ast.dump(n)], "imported at module level"
    seams = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and any(isinstance(n, ast.ImportFrom) and n.module == hook for n in ast.walk(f))]
    assert seams == ["load_test_hooks"]
