"""The layers import in one direction, and no attnc module imports itself through others.

Packages: ir <- frontend <- kernels; ir <- lowering <- runtime <- bench <- cli; the runtime
also reads the frontend (it traces kernels and binds what their mods capture); attnc.quant
(the numpy reference of the quantized KV formats) imports nothing of attnc; the IR interpreter,
the runtime and bench read it. Inside the
runtime, modules sit in layers too (dispatch at the bottom, the public API and the tuner at
the top). Every import counts: module-level, inside functions, and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "attnc"
# what each package may import from attnc, besides itself
ALLOWED = {
    "ir": {"attnc.errors", "attnc.quant", "attnc._version"},
    "frontend": {"attnc.errors", "attnc.ir", "attnc._version"},
    "kernels": {"attnc.frontend"},
    "lowering": {"attnc.errors", "attnc.ir", "attnc._version"},
    "runtime": {"attnc.errors", "attnc.ir", "attnc.frontend", "attnc.lowering", "attnc.kernels", "attnc.quant",
                "attnc._version"},
    "bench": {"attnc.errors", "attnc.ir", "attnc.lowering", "attnc.runtime", "attnc.quant", "attnc._version",
              "attnc.argparsing"},
}
# runtime modules, bottom layer first: a module may import only from earlier layers
RUNTIME_LAYERS = [
    {"lru", "cachedir", "locking"},  # no attnc imports: the bounded map every cache uses, the cache
    # directory, the lock of calls from several threads
    {"dispatch"},
    {"devices", "timing"},
    {"tensor"},
    {"params"},
    {"build", "prepared", "chunking", "tuning_cache", "store"},
    {"api", "custom"},
    {"kvcache", "tune", "paged"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The attnc modules a file imports, anywhere in it (`from attnc.x import y` counts as
    attnc.x.y when that is a module, else attnc.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "attnc" or m.startswith("attnc.")}


MODULES = {_module_name(f): f for f in PKG.rglob("*.py")}
GRAPH = {name: {m for m in _imports(f) if m in MODULES and m != name} for name, f in MODULES.items()}


def test_layers_import_in_one_direction() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for f in (PKG / layer).rglob("*.py"):
            for m in _imports(f):
                own = m == f"attnc.{layer}" or m.startswith(f"attnc.{layer}.")
                if not own and not any(m == a or m.startswith(a + ".") for a in allowed):
                    bad.append(f"{f.relative_to(PKG.parent)} imports {m}")
    assert not bad, "\n".join(bad)


def test_runtime_modules_import_downwards() -> None:
    level = {name: i for i, names in enumerate(RUNTIME_LAYERS) for name in names}
    found = {f.stem for f in (PKG / "runtime").glob("*.py")} - {"__init__"}
    assert found <= set(level), f"runtime modules without a layer in RUNTIME_LAYERS: {sorted(found - set(level))}"
    bad = []
    for name in found:
        for m in GRAPH[f"attnc.runtime.{name}"]:
            if m.startswith("attnc.runtime.") and level[m.rsplit(".", 1)[1]] >= level[name]:
                bad.append(f"attnc.runtime.{name} imports {m}, which is not in a lower layer")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    # a package's __init__ re-exporting its submodules is not a cycle of the code itself
    graph = {name: {m for m in deps if not (name.startswith(m + ".") and MODULES[m].name == "__init__.py")}
             for name, deps in GRAPH.items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_import_resolves() -> None:
    """Every `from attnc.x import y` in attnc, including those inside functions (which run
    only when the function does), names something that exists: moved code cannot leave a
    stale import behind in a path the other tests do not take."""
    import importlib

    bad = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("attnc"):
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if not hasattr(mod, alias.name) and sub not in MODULES:
                        bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not bad, "\n".join(bad)


def test_quant_is_a_leaf() -> None:
    assert not GRAPH["attnc.quant"], f"attnc.quant imports {sorted(GRAPH['attnc.quant'])}"
