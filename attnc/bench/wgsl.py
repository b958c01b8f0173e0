"""A tiny WGSL writer for the benchmark's own kernels (ceilings and the naive baseline).

Decisions are made in Python by the code that calls it (which lines to emit, which
expressions to use); the writer only handles declarations, indentation and layout, and no
WGSL text here carries a condition.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

INDENT = "    "


def f32(value: float) -> str:
    """A WGSL f32 literal that round-trips `value` (as float32)."""
    text = repr(float(value))
    return text if any(c in text for c in ".eE") else text + ".0"


@dataclass
class Shader:
    """One compute entry point: enables, module-scope declarations, builtins and a body."""

    name: str = "main"
    workgroup_size: tuple[int, int, int] = (64, 1, 1)
    enables: list[str] = field(default_factory=list)
    decls: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    _depth: int = 1
    _bindings: int = 0

    def enable(self, extension: str) -> None:
        """Add an `enable` directive (e.g. f16)."""
        self.enables.append(f"enable {extension};")

    def const(self, name: str, value: str, type_: str = "u32") -> None:
        """A module-scope `const name: type = value;`."""
        self.decls.append(f"const {name}: {type_} = {value};")

    def storage(self, name: str, elem: str, access: str = "read") -> int:
        """Declare the next binding as a storage array of `elem`; returns its binding index."""
        index = self._bindings
        self._bindings += 1
        self.decls.append(f"@group(0) @binding({index}) var<storage, {access}> {name}: array<{elem}>;")
        return index

    def uniform(self, name: str, fields: list[tuple[str, str]]) -> int:
        """Declare a struct of `fields` bound as the next uniform; returns its binding index."""
        type_ = name.capitalize() + "Params"
        members = " ".join(f"{f}: {t}," for f, t in fields)
        self.decls.append(f"struct {type_} {{ {members} }}")
        index = self._bindings
        self._bindings += 1
        self.decls.append(f"@group(0) @binding({index}) var<uniform> {name}: {type_};")
        return index

    def workgroup_var(self, name: str, type_: str) -> None:
        """A `var<workgroup>` declaration."""
        self.decls.append(f"var<workgroup> {name}: {type_};")

    def builtin(self, builtin: str, name: str, type_: str = "vec3<u32>") -> None:
        """An entry-point parameter bound to a builtin."""
        self.params.append(f"@builtin({builtin}) {name}: {type_}")

    def line(self, text: str) -> None:
        """Append one statement at the current indentation."""
        self.body.append(INDENT * self._depth + text)

    def lines(self, texts: list[str]) -> None:
        """Append several statements."""
        for text in texts:
            self.line(text)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        """`header {` ... `}` with the body indented."""
        self.line(header + " {")
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self.line("}")

    def render(self) -> str:
        """The complete WGSL module."""
        x, y, z = self.workgroup_size
        head = self.enables + ([""] if self.enables else []) + self.decls
        sig = f"fn {self.name}({', '.join(self.params)})"
        entry = [f"@compute @workgroup_size({x}, {y}, {z})", sig + " {", *self.body, "}"]
        return "\n".join(head + [""] + entry) + "\n"
