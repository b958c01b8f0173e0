"""The layers import in one direction: ir <- frontend, ir <- lowering <- runtime (STYLE.md #1)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "attnc"
# what each layer may import from attnc, besides itself
ALLOWED = {
    "ir": {"attnc.errors", "attnc._version"},
    "frontend": {"attnc.errors", "attnc.ir", "attnc._version"},
    "lowering": {"attnc.errors", "attnc.ir", "attnc._version"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "attnc" or m.startswith("attnc.")}


def test_layers_import_in_one_direction() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for f in (PKG / layer).rglob("*.py"):
            for m in _imports(f):
                own = m == f"attnc.{layer}" or m.startswith(f"attnc.{layer}.")
                if not own and not any(m == a or m.startswith(a + ".") for a in allowed):
                    bad.append(f"{f.relative_to(PKG.parent)} imports {m}")
    assert not bad, "\n".join(bad)
