"""Write the example page's cases (inputs + numpy-expected outputs) into examples/browser/data/.

python examples/browser/make_cases.py && python -m http.server -d . 8000
# then open http://127.0.0.1:8000/examples/browser/ (Chromium: --enable-unsafe-webgpu)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "js"))

from js_cases import write_cases  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data"
    spec = write_cases(out)
    print(f"wrote {len(spec['cases'])} cases to {out / 'cases.json'}")
