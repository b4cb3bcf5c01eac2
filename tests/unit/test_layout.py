"""The layout is the architecture: what each part of `kubedistill/` may import, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "kubedistill"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """kubedistill modules `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kubedistill")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kubedistill"):
            for a in node.names:  # `from kubedistill.core import spec` imports the module kubedistill.core.spec
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() else node.module)
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {_module(p): _imports(p, top_level_only) for p in PKG.rglob("*.py")}


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges a -> b where b imports a back, directly or through others."""

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    return sorted((m, n) for m, deps in graph.items() for n in deps if m in reaches(n))


def test_no_import_cycles_not_even_through_imports_inside_functions():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b"), ("b", "c"), ("c", "a")]
    assert _cycles(_graph(top_level_only=False)) == []


def test_core_and_cluster_import_no_stage_and_no_ml_module_even_lazily():
    """The operator imports core/ and cluster/: a stage or an ML module there would load torch into it.
    The registry names stage functions by string for the same reason."""
    for m, deps in _graph(top_level_only=False).items():
        if m.startswith(("kubedistill.core", "kubedistill.cluster")):
            bad = sorted(d for d in deps if d.startswith(("kubedistill.stages", "kubedistill.ml")))
            assert bad == [], f"{m} imports {bad}"
        if m.startswith("kubedistill.core"):
            assert not [d for d in deps if d.startswith("kubedistill.cluster")], m


def test_every_registry_entry_points_into_stages():
    from kubedistill.core import registry

    for d in registry.STAGES:
        assert d.run.startswith("kubedistill.stages."), d.name
