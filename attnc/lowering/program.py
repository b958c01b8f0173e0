"""What lowering hands to the runtime and to `attnc compile`: WGSL programs plus their binding and uniform layout."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Access(enum.Enum):
    """How a shader binding is accessed."""

    READ = "read"
    READ_WRITE = "read_write"
    UNIFORM = "uniform"


class Scalar(enum.Enum):
    """Scalar element types that cross the host/shader boundary."""

    F32 = "f32"
    F16 = "f16"
    I32 = "i32"
    U32 = "u32"

    @property
    def nbytes(self) -> int:
        return 2 if self is Scalar.F16 else 4


@dataclass(frozen=True, slots=True)
class Binding:
    """One `@group(0) @binding(n)` resource: a named buffer of `elem` values or the uniform block."""

    name: str
    binding: int
    access: Access
    elem: Scalar


@dataclass(frozen=True, slots=True)
class UniformField:
    """One 4-byte field of the uniform struct (all fields are u32/i32/f32, so offsets are 4*i)."""

    name: str
    offset: int
    type: Scalar


@dataclass(frozen=True, slots=True)
class Program:
    """One compute entry point: its WGSL text, workgroup size, bindings and uniform layout.

    The dispatch is one-dimensional over `grid` workgroups (a product of named factors
    evaluated from shapes); the runtime folds it into (x, y, z) when it exceeds the
    per-dimension limit, and the shader re-linearises the workgroup id and returns early
    past the end (the uniform field `grid_total` carries the true count).

    `in_bounds`: every index the program makes into an array, a vector or a buffer stays in
    bounds for any shapes and strides the runtime describes in its uniforms. attnc's own
    kernels are built that way (reads guarded or clamped, `clamp_ix`) and tested under the
    bounds sanitizer (lowering/sanitize.py); the runtime then creates them without the
    compiler's own index clamps where it can (`runtime/dispatch.py::_shader_module`).
    """

    name: str
    wgsl: str
    entry_point: str
    workgroup_size: int
    bindings: tuple[Binding, ...]
    uniforms: tuple[UniformField, ...]
    grid: tuple[str, ...]
    features: frozenset[str]
    workgroup_storage_bytes: int
    in_bounds: bool = False
    # scratch buffers this program fills for the ones after it: (binding name, factors whose
    # product is the u32 word count, in the grid's syntax)
    scratch: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def uniform_size(self) -> int:
        """Size in bytes of the uniform block, rounded up to 16 as WGSL requires."""
        end = max((f.offset + 4 for f in self.uniforms), default=4)
        return (end + 15) // 16 * 16


def storage_buffers(progs: tuple[Program, ...]) -> int:
    """The most storage buffers one of the programs binds (WebGPU limits them per shader stage)."""
    return max(sum(b.access is not Access.UNIFORM for b in p.bindings) for p in progs)
