"""js/README.md's Node set-up runs as written: its block, then the page's `attn.run` call on
the flash-attention example compiled as the page says, in a folder laid out as it describes
(the script in `js/` beside attnc.js and node_modules, `out/` from `attnc compile`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
from conftest import ROOT, node_or_missing, package_or_missing

from tests.textbook import attention_ref

README = ROOT / "js" / "README.md"
SHAPES = dict(B=1, Hq=8, Hkv=2, S=128, T=128, D=64, Dv=64)


def _blocks() -> list[str]:
    return re.findall(r"```js\n(.*?)```", README.read_text(), re.S)


def _inputs() -> dict[str, np.ndarray]:
    """q, k, v as the script below fills them: sin(i * c) for element i."""
    B, Hq, Hkv, S, T, D, Dv = SHAPES.values()
    shapes = {"q": ((B, Hq, S, D), 0.37), "k": ((B, Hkv, T, D), 0.53), "v": ((B, Hkv, T, Dv), 0.71)}
    return {n: np.sin(np.arange(np.prod(s)) * c).astype(np.float32).reshape(s) for n, (s, c) in shapes.items()}


def test_the_node_setup_and_run_call_work_as_written(tmp_path) -> None:
    node = node_or_missing()
    package_or_missing("webgpu")
    blocks = _blocks()
    setup = next(b for b in blocks if "from 'webgpu'" in b)
    run_line = next(line for b in blocks for line in b.splitlines() if "await attn.run(" in line)
    out = tmp_path / "out"
    example = ROOT / "examples" / "flash_attention.attn"
    subprocess.run([sys.executable, "-m", "attnc", "compile", str(example), "-o", str(out)], check=True,
                   capture_output=True, cwd=ROOT)
    js = tmp_path / "js"
    js.mkdir()
    (js / "attnc.js").write_text((ROOT / "js" / "attnc.js").read_text())
    (js / "node_modules").symlink_to(ROOT / "js" / "node_modules")
    fill = "".join(f"const {n} = Float32Array.from({{length: {x.size}}}, (_, i) => Math.fround(Math.sin(i * {c})));\n"
                   for n, x, c in zip("qkv", _inputs().values(), (0.37, 0.53, 0.71), strict=True))
    script = js / "readme_node.mjs"
    script.write_text(setup + fill + run_line + "\n"
                      "await (await import('node:fs/promises')).writeFile('o.json', JSON.stringify({variant: "
                      "attn.variant.name, o: Array.from(o)}));\nprocess.exit(0);\n")
    proc = subprocess.run([node, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, f"js/README.md's Node set-up failed:\n{proc.stdout}\n{proc.stderr}"
    res = json.loads((tmp_path / "o.json").read_text())
    x = _inputs()
    ref = attention_ref(x["q"].astype(np.float64), x["k"].astype(np.float64), x["v"].astype(np.float64))
    o = np.asarray(res["o"], np.float64).reshape(ref.shape)
    err = np.linalg.norm(o - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, (res["variant"], err)

