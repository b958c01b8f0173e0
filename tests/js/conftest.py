"""Fixtures for the JS loader tests: the cases folder, and one Node run and one Chromium run
per session (each runner does every case in one process, so the browser starts once).

Missing node, npm packages (js/node_modules) or chromium skip these tests locally and fail
them in CI (CI=true). Install them with scripts/setup.sh.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import js_cases  # noqa: E402

CHROMIUM = os.environ.get("ATTNC_CHROMIUM", "/usr/lib/chromium/chromium")
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
FULL = os.environ.get("ATTNC_JS_FULL", "").strip().lower() in {"1", "true", "yes"}
# Seconds for one runner: a cold lavapipe spends 3-9 s compiling each flash-attention pipeline
# (14 by default, 58 with ATTNC_JS_FULL=1); Mesa's shader cache makes reruns take seconds.
RUNNER_TIMEOUT = float(os.environ.get("ATTNC_JS_TIMEOUT", 1800 if FULL else 400))


def missing(what: str) -> None:
    """Skip locally, fail in CI: the JS tests are part of what CI must prove."""
    msg = f"{what} (install with: bash scripts/setup.sh)"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def node_or_missing() -> str:
    node = shutil.which("node")
    if not node:
        missing("node is not installed")
    return node


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable (missing: skipped locally, failed in CI)."""
    return node_or_missing()


def package_or_missing(name: str) -> None:
    if not (ROOT / "js" / "node_modules" / name / "package.json").is_file():
        missing(f"npm package {name} is not installed in js/node_modules")


@pytest.fixture(scope="session")
def cases_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("attnc_js") / "cases"
    js_cases.write_cases(folder)
    return folder


_FAILED: dict[str, str] = {}  # a runner that failed once is not started again for every test


def _once(key: str, make):
    if key in _FAILED:
        pytest.fail(_FAILED[key], pytrace=False)
    try:
        return make()
    except AssertionError as e:
        _FAILED[key] = str(e)
        raise


def _run(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    env = dict(os.environ, ATTNC_PAGE_TIMEOUT_MS=str(int(timeout * 1000)))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, cwd=ROOT, env=env)
    return time.perf_counter() - t0, proc


@pytest.fixture(scope="session")
def node_results(cases_dir: Path) -> dict:
    return _once("node", lambda: _node_results(cases_dir))


def _node_results(cases_dir: Path) -> dict:
    node = node_or_missing()
    package_or_missing("webgpu")
    out = cases_dir.parent / "node.json"
    secs, proc = _run([node, str(HERE / "run_node.mjs"), str(cases_dir / "cases.json"), str(out)], RUNNER_TIMEOUT)
    assert proc.returncode == 0 and out.is_file(), f"node runner failed:\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(out.read_text())
    res["wall_s"] = secs
    return res


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@pytest.fixture(scope="session")
def browser_results(cases_dir: Path) -> dict:
    return _once("chromium", lambda: _browser_results(cases_dir))


def _browser_results(cases_dir: Path) -> dict:
    node = node_or_missing()
    package_or_missing("playwright-core")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"chromium is not installed at {CHROMIUM}")
    # Served tree: /js, /examples (links into the repo) and /cases (this session's data).
    site = cases_dir.parent / "site"
    site.mkdir(exist_ok=True)
    for name, target in (
        ("js", ROOT / "js"),
        ("examples", ROOT / "examples"),
        ("cases", cases_dir),
    ):
        if not (site / name).exists():
            (site / name).symlink_to(target, target_is_directory=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/examples/browser/index.html?cases=/cases/cases.json&outputs=1&repeat=1"
        out = cases_dir.parent / "browser.json"
        secs, proc = _run([node, str(HERE / "run_browser.mjs"), url, str(out), CHROMIUM], RUNNER_TIMEOUT)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0 and out.is_file(), f"browser runner failed:\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(out.read_text())
    assert "fatal" not in res, f"example page failed: {res.get('fatal')}\nconsole: {res.get('console')}"
    res["wall_s"] = secs
    return res
