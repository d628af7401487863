"""The layering of docs/ARCHITECTURE.md, checked on the source: floors that only look down, no import
cycle (imports inside functions included), no private name imported across modules, no function
over 60 lines, no dataset named outside its declaration."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"quantlens": ROOT / "quantlens", "quantlens.tasks": ROOT / "tasks", "quantlens.flows": ROOT / "flows"}

# bottom up: a module may import its own layer or a lower one (docs/ARCHITECTURE.md)
LAYERS = ["quantlens", "quantlens.model", "quantlens.quantize", "quantlens.checkpoints", "quantlens.evaluation",
          "quantlens.analysis", "quantlens.pipeline", "quantlens.tasks", "quantlens.flows", "quantlens.pipeline.cli"]
MAX_LINES = 60

# What the redesign has not reached yet, by check: an entry here is a known debt, not a pass. A new
# violation fails at once, and so does an entry that no longer occurs (delete it: the list only shrinks).
KNOWN: dict[str, set[str]] = {
    "layers": set(),
    "cycles": set(),
    "private": set(),
    "long": set(),
    "datasets": set(),
}


def ratchet(check: str, found: list[str]) -> None:
    new = sorted(set(found) - KNOWN[check])
    stale = sorted(KNOWN[check] - set(found))
    assert not new, f"{check}: new violations of docs/ARCHITECTURE.md:\n" + "\n".join(new)
    assert not stale, f"{check}: fixed — delete from KNOWN in tests/test_architecture.py:\n" + "\n".join(stale)


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("").parts
            if pkg == "quantlens" and rel[0] in ("tasks", "flows"):
                continue
            name = ".".join((pkg, *rel)).removesuffix(".__init__")
            out[name] = f
    return out


MODULES = modules()
TREES = {name: ast.parse(f.read_text(), str(f)) for name, f in MODULES.items()}


def imports(name: str) -> list[tuple[str, str, int]]:
    """(module imported, name imported or "", line) of every import in module ``name``, at any depth."""
    pkg = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] == "quantlens"]


def layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def test_floors_only_look_down():
    ratchet("layers", [f"{name} imports {target} ({LAYERS[layer(target)]} is above {LAYERS[layer(name)]})"
                       for name in MODULES for target, _, _ in imports(name)
                       if target in MODULES and layer(target) > layer(name)])


def test_no_import_cycle():
    graph = defaultdict(set)
    for name in MODULES:
        graph[name] |= {t for t, _, _ in imports(name) if t in MODULES and t != name}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(" -> ".join(sorted(comp)))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    ratchet("cycles", cycles)


def test_no_private_name_imported_across_modules():
    ratchet("private", [f"{name} imports {target}.{n}" for name in MODULES for target, n, _ in imports(name)
                        if n.startswith("_") and not n.startswith("__")])


def test_no_function_over_60_lines():
    ratchet("long", [f"{MODULES[name].relative_to(ROOT)} {node.name}"
                     for name, tree in TREES.items() for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES])


def test_datasets_are_named_only_in_their_declarations():
    from quantlens.evaluation.data import DATASETS

    names = set(DATASETS) | {"lm-eval"}
    declared = ROOT / "quantlens" / "evaluation"
    wrong = []
    for name, tree in TREES.items():
        f = MODULES[name]
        if f.is_relative_to(declared / "datasets") or f == declared / "data.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators, *[e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                                                                      for e in c.elts]]
                          if isinstance(c, ast.Constant) and c.value in names]
                wrong += [f"{f.relative_to(ROOT)} {node_owner(tree, node)} compares with {c.value!r}" for c in consts]
    ratchet("datasets", wrong)


def node_owner(tree: ast.AST, target: ast.AST) -> str:
    """The innermost function (or class) holding ``target``: a line-free place for the ratchet."""
    best = "<module>"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.lineno <= target.lineno <= node.end_lineno:
            if best == "<module>" or node.lineno >= best_line:
                best, best_line = node.name, node.lineno
    return best


@pytest.mark.parametrize("bad, why", [
    ("from quantlens.pipeline.sweep import SweepConfig\n", "above"),
    ("def f():\n    from quantlens.flows import sweep\n", "above"),
])
def test_the_layering_check_sees_an_import_against_it(tmp_path, bad, why):
    """The check itself: an import of a higher floor — at the top or inside a function — is caught."""
    MODULES["quantlens.model._probe"] = tmp_path / "probe.py"
    TREES["quantlens.model._probe"] = ast.parse(bad)
    try:
        with pytest.raises(AssertionError, match=why):  # a new violation: never in KNOWN
            test_floors_only_look_down()
    finally:
        del MODULES["quantlens.model._probe"], TREES["quantlens.model._probe"]
