"""A bounds sanitizer for WGSL programs: every index into an array or vector checked at run time.

`instrument(program)` rewrites each indexed access `a[i]` into an array variable (a storage
buffer, a workgroup, private or function-scope array, and the arrays or vectors inside them) as
`a[attnc_chk(u32(i), len, site)]`. The check records an index past the end (a negative i32
index too, as a large u32) in an extra storage buffer and clamps it, so the instrumented shader
itself stays in bounds. The runtime reads that buffer after the dispatch and reports the sites
(`ATTNC_SANITIZE=bounds`, runtime/dispatch.py).

This is how attnc shows its shaders are in bounds by construction: the property tests run every
strategy under the sanitizer. That is the condition for creating the shaders without the
compilers' own bounds checks (Naga's clamps, Tint's robustness), which cost 10-17 % on an H200.
Both operands of a WGSL `select` are evaluated, so an access whose result is discarded still
counts: it is undefined behaviour once the compiler's clamps are gone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from attnc.errors import LoweringError
from attnc.lowering.program import Access, Binding, Program, Scalar

BUFFER = "attnc_oob"  # the record: [violations, then (hit, max index, length) per site]
CHECK = "attnc_chk"
WORDS_PER_SITE = 3

_DECL = re.compile(
    r"\bvar(?:<[^>]*>)?\s+([A-Za-z_][A-Za-z_0-9]*)\s*:\s*((?:array|vec[234])\s*<)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_DIRECTIVE = re.compile(r"^\s*(enable|requires|diagnostic)\b")


@dataclass(frozen=True, slots=True)
class Site:
    """One checked access: where it is in the original WGSL, and its text."""

    line: int
    column: int
    text: str


@dataclass(frozen=True, slots=True)
class _Type:
    """An indexable WGSL type: its length (None: runtime-sized) and element type."""

    length: int | None
    elem: _Type | None


def _split_args(s: str) -> list[str]:
    """Top-level comma-separated parts of a template argument list."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _parse_type(s: str) -> _Type | None:
    """The indexable structure of a WGSL type (None for scalars, atomics and structs)."""
    s = s.strip()
    m = re.fullmatch(r"(array|vec([234]))\s*<(.*)>", s, re.DOTALL)
    if m is None:
        return None
    args = _split_args(m.group(3))
    if m.group(2):
        return _Type(int(m.group(2)), None)
    if len(args) == 1:
        return _Type(None, _parse_type(args[0]))
    return _Type(int(args[1].rstrip("u")), _parse_type(args[0]))


def _type_text(code: str, start: int) -> tuple[str, int]:
    """The type starting at `start` (just after the name and colon), through its closing `>`."""
    depth, i = 0, start
    while i < len(code):
        if code[i] == "<":
            depth += 1
        elif code[i] == ">":
            depth -= 1
            if depth == 0:
                return code[start : i + 1], i + 1
        i += 1
    raise LoweringError(f"sanitizer: unterminated type at offset {start}")


def _declarations(code: str) -> dict[str, _Type]:
    """Array and vector variables by name (attnc's generated names are unique per shader)."""
    found: dict[str, _Type] = {}
    for m in _DECL.finditer(code):
        text, _ = _type_text(code, m.start(2))
        t = _parse_type(text)
        if t is None:
            continue
        if m.group(1) in found and found[m.group(1)] != t:
            raise LoweringError(f"sanitizer: {m.group(1)!r} is declared with two different types")
        found[m.group(1)] = t
    return found


def _strip_comments(code: str) -> str:
    """The code with `//` comments blanked out (same length, so offsets still match)."""
    return re.sub(r"//[^\n]*", lambda m: " " * len(m.group(0)), code)


class _Rewriter:
    """One pass over the code, wrapping each index of a declared array or vector."""

    def __init__(self, code: str, arrays: dict[str, _Type]):
        self.code, self.arrays = code, arrays
        self.sites: list[Site] = []
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(code) if ch == "\n"]

    def _where(self, offset: int) -> tuple[int, int]:
        lo, hi = 0, len(self.line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.line_starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, offset - self.line_starts[lo] + 1

    def _close(self, i: int) -> int:
        """The offset of the `]` matching the `[` at i."""
        depth = 0
        for j in range(i, len(self.code)):
            if self.code[j] == "[":
                depth += 1
            elif self.code[j] == "]":
                depth -= 1
                if depth == 0:
                    return j
        raise LoweringError(f"sanitizer: unbalanced '[' at line {self._where(i)[0]}")

    def rewrite(self, start: int, end: int) -> str:
        """The code in [start, end) with every access to a declared array checked."""
        out: list[str] = []
        i = start
        code = self.code
        while i < end:
            m = _IDENT.match(code, i)
            if m is None or (i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_.")):
                out.append(code[i])
                i += 1
                continue
            name, j = m.group(0), m.end()
            out.append(name)
            t = self.arrays.get(name)
            while t is not None:
                k = j
                while k < end and code[k] in " \t":
                    k += 1
                if k >= end or code[k] != "[":
                    break
                close = self._close(k)
                inner = self.rewrite(k + 1, close)
                length = f"arrayLength(&{name})" if t.length is None else f"{t.length}u"
                line, col = self._where(m.start())
                site = len(self.sites)
                self.sites.append(Site(line, col, code[m.start() : close + 1]))
                out.append(f"[{CHECK}(u32({inner}), {length}, {site}u)]")
                j, t = close + 1, t.elem
            i = j
        return "".join(out)


def _entry_body(code: str, entry: str) -> tuple[int, int]:
    """Offsets of the `{` and the matching `}` of the entry point's body."""
    m = re.search(rf"@compute[^{{]*\bfn\s+{re.escape(entry)}\s*\(", code)
    if m is None:
        raise LoweringError(f"sanitizer: no compute entry point {entry!r}")
    start = code.index("{", m.end())
    depth = 0
    for j in range(start, len(code)):
        depth += {"{": 1, "}": -1}.get(code[j], 0)
        if depth == 0:
            return start, j
    raise LoweringError(f"sanitizer: unbalanced braces in {entry!r}")


def _support(binding: int) -> list[str]:
    """The record binding, the check and the flush. An invocation notes its violations in
    private variables and writes them out once, at each exit of the entry point: atomics at
    every access made lavapipe's compile of the unrolled shaders 10x slower, and so did a branch
per access (llvmpipe's coroutine splitting): the check is branch-free."""
    rec = BUFFER
    return [
        f"@group(0) @binding({binding}) var<storage, read_write> {rec}: array<atomic<u32>>;",
        "var<private> attnc_hits: u32;",
        "var<private> attnc_site: u32;",
        "var<private> attnc_index: u32;",
        "var<private> attnc_length: u32;",
        f"fn {CHECK}(i: u32, n: u32, site: u32) -> u32 {{",
        "  let bad = i >= n;",
        "  attnc_hits = attnc_hits + select(0u, 1u, bad);",
        "  attnc_site = select(attnc_site, site, bad);",
        "  attnc_index = select(attnc_index, i, bad);",
        "  attnc_length = select(attnc_length, n, bad);",
        "  return min(i, max(n, 1u) - 1u);",
        "}",
        "fn attnc_flush() {",
        "  if (attnc_hits != 0u) {",
        f"    atomicAdd(&{rec}[0], attnc_hits);",
        f"    atomicOr(&{rec}[1u + {WORDS_PER_SITE}u * attnc_site], 1u);",
        f"    atomicMax(&{rec}[2u + {WORDS_PER_SITE}u * attnc_site], attnc_index);",
        f"    atomicMax(&{rec}[3u + {WORDS_PER_SITE}u * attnc_site], attnc_length);",
        "  }",
        "}",
    ]


def instrument(program: Program) -> tuple[Program, tuple[Site, ...]]:
    """The program with every array and vector index checked, and the checked sites in order
    (site n's record is words 1 + 3n .. 3 + 3n of the `attnc_oob` binding). Each invocation
    reports the last site it violated; the record keeps every site some invocation reported."""
    code = _strip_comments(program.wgsl)
    rw = _Rewriter(code, _declarations(code))
    open_, close = _entry_body(code, program.entry_point)
    entry = rw.rewrite(open_, close)
    entry = re.sub(r"\breturn\s*;", "{ attnc_flush(); return; }", entry)
    body = rw.rewrite(0, open_) + entry + "  attnc_flush();\n" + rw.rewrite(close, len(code))
    binding = max((b.binding for b in program.bindings), default=-1) + 1
    lines = body.split("\n")
    head = 0
    while head < len(lines) and (_DIRECTIVE.match(lines[head]) or not lines[head].strip()):
        head += 1
    wgsl = "\n".join(lines[:head] + _support(binding) + lines[head:])
    bindings = (*program.bindings, Binding(BUFFER, binding, Access.READ_WRITE, Scalar.U32))
    return replace(program, wgsl=wgsl, bindings=bindings), tuple(rw.sites)


def record_words(sites: tuple[Site, ...]) -> int:
    """Words in the `attnc_oob` record of a program with these sites."""
    return 1 + WORDS_PER_SITE * len(sites)


def violations(record: list[int], sites: tuple[Site, ...]) -> list[tuple[Site, int, int]]:
    """(site, largest index, length) of every site that was indexed out of bounds."""
    out = []
    for n, site in enumerate(sites):
        base = 1 + WORDS_PER_SITE * n
        if record[base]:
            out.append((site, record[base + 1], record[base + 2]))
    return out
