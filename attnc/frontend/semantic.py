"""The DSL's semantic layer: an explicit IR builder, dtype promotion and legality checks.

Promotion rules (numbered so errors can cite them):
  1. Python ints become i32 constants, Python floats f32 constants, bools bool constants.
  2. An i32 meeting an f32 in arithmetic or a comparison is converted with f32(...).
  3. `/` is float division (both sides converted to f32); `//` and `%` need i32 on both sides.
  4. exp/log/tanh/sqrt/rsqrt/sin/cos/tan/exp2/log2/floor/ceil/sigmoid take f32 (an i32
     argument is converted).
  5. `&`, `|`, `~` and where()'s condition need bool values (comparisons make them);
     `==` and `!=` also compare two bools.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnc.errors import Span, TraceError
from attnc.ir import nodes as ir
from attnc.ir.share import share_repeated
from attnc.ir.verify import F32_MAX, F32_MAX_ROUNDING

_FRONTEND_DIR = os.path.dirname(os.path.abspath(__file__))


def user_span() -> Span | None:
    """The span of the innermost stack frame outside attnc's DSL implementation."""
    frame = inspect.currentframe()
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not fname.startswith(_FRONTEND_DIR):
            info = inspect.getframeinfo(frame, context=1)
            pos = info.positions
            col = (pos.col_offset or 0) + 1 if pos else 1
            end = (pos.end_col_offset or 0) + 1 if pos and pos.end_lineno == pos.lineno else None
            line = info.code_context[0] if info.code_context else ""
            return Span(fname, info.lineno, col, line, end)
        frame = frame.f_back
    return None


def fail(message: str, notes: tuple[str, ...] = ()) -> TraceError:
    """A TraceError located at the user's current Python line."""
    return TraceError(message, user_span(), notes)


def promote(a: ir.Expr, b: ir.Expr, what: str) -> tuple[ir.Expr, ir.Expr]:
    """Rule 2: bring two numeric operands to one dtype."""
    for x in (a, b):
        if x.dtype is ir.DType.BOOL:
            raise fail(f"{what} needs numbers, got a bool", ("use where(cond, a, b)",))
    if a.dtype == b.dtype:
        return a, b
    return to_f32(a), to_f32(b)


def to_f32(x: ir.Expr) -> ir.Expr:
    """Convert an i32 value to f32 (rule 2/3/4); f32 stays as it is."""
    if x.dtype is ir.DType.F32:
        return x
    if isinstance(x, ir.Const):
        return ir.Const(float(x.value), ir.DType.F32, span=x.span)
    if x.dtype is ir.DType.BOOL:
        raise fail("cannot use a bool as a number", ("use where(cond, 1.0, 0.0)",))
    return ir.Call(ir.Op.F32, (x,), ir.DType.F32, user_span())


def const(v: object) -> ir.Expr:
    """Rule 1: Python constants (and numpy's scalar bools, ints and floats) to IR constants."""
    if isinstance(v, np.generic) and v.dtype.kind in "biuf":
        v = v.item()
    if isinstance(v, bool):
        return ir.Const(v, ir.DType.BOOL, user_span())
    if isinstance(v, int):
        if not -(2**31) <= v < 2**31:
            raise fail(f"integer constant {v} does not fit in i32")
        return ir.Const(v, ir.DType.I32, user_span())
    if isinstance(v, float):
        if math.isfinite(v) and abs(v) >= F32_MAX_ROUNDING:
            raise fail(f"float constant {v!r} is outside f32's range (largest {F32_MAX:.7g})",
                       ("use float('inf') (or math.inf) for an infinity",))
        return ir.Const(v, ir.DType.F32, user_span())
    raise fail(f"cannot use a {type(v).__name__} in a kernel expression",
               ("kernel expressions take traced values, ints, floats and bools (Python's or numpy's scalars)",))


def call(op: ir.Op, *args: ir.Expr) -> ir.Expr:
    """Build a Call, applying the promotion rules and checking operand kinds."""
    span = user_span()
    if op in ir.BOOL_COMPARE and args[0].dtype is ir.DType.BOOL and args[1].dtype is ir.DType.BOOL:
        return ir.Call(op, (args[0], args[1]), ir.DType.BOOL, span)
    if op in ir.ARITH_BINARY | ir.COMPARE:
        a, b = promote(args[0], args[1], op.value)
        dt = ir.DType.BOOL if op in ir.COMPARE else a.dtype
        return ir.Call(op, (a, b), dt, span)
    if op in ir.INT_BINARY:
        if any(a.dtype is not ir.DType.I32 for a in args):
            raise fail(f"'{op.value}' (// or %) needs i32 operands",
                       ("use / for float division",))
        return ir.Call(op, args, ir.DType.I32, span)
    if op is ir.Op.DIV:
        return ir.Call(op, (to_f32(args[0]), to_f32(args[1])), ir.DType.F32, span)
    if op in ir.FLOAT_UNARY:
        return ir.Call(op, (to_f32(args[0]),), ir.DType.F32, span)
    if op in ir.ARITH_UNARY:
        if args[0].dtype is ir.DType.BOOL:
            raise fail(f"'{op.value}' needs a number, got a bool")
        return ir.Call(op, args, args[0].dtype, span)
    if op in ir.LOGIC:
        if any(a.dtype is not ir.DType.BOOL for a in args):
            raise fail(f"'{op.value}' needs bool operands",
                       ("comparisons such as kv_idx <= q_idx give bools",))
        return ir.Call(op, args, ir.DType.BOOL, span)
    if op is ir.Op.WHERE:
        c, a, b = args
        if c.dtype is not ir.DType.BOOL:
            raise fail("where() needs a bool condition")
        if a.dtype is ir.DType.BOOL and b.dtype is ir.DType.BOOL:  # a choice between two masks
            return ir.Call(op, (c, a, b), ir.DType.BOOL, span)
        a, b = promote(a, b, "where")
        return ir.Call(op, (c, a, b), a.dtype, span)
    if op is ir.Op.F32:
        return to_f32(args[0])
    if op is ir.Op.I32:
        return args[0] if args[0].dtype is ir.DType.I32 else ir.Call(op, args, ir.DType.I32, span)
    raise fail(f"unsupported operator {op.value}")


@dataclass
class Builder:
    """Collects statements while a kernel function runs under tracing."""

    name: str
    params: dict[str, ir.Param] = field(default_factory=dict)
    tunables: dict[str, int] = field(default_factory=dict)
    scopes: list[list[ir.Stmt]] = field(default_factory=lambda: [[]])
    names: set[str] = field(default_factory=set)
    captures: Any = None  # the capture.Session of this trace
    captured: dict[str, Any] = field(default_factory=dict)  # captured param name -> capture.Slot
    capture_scalars: dict[str, Any] = field(default_factory=dict)  # captured number param -> path
    let_values: dict[str, ir.Expr] = field(default_factory=dict)
    kernel_inputs: dict[str, Span | None] = field(default_factory=dict)  # inputs the kernel reads by name
    mod_inputs: dict[str, Span | None] = field(default_factory=dict)  # inputs a mod declares, where

    def emit(self, stmt: ir.Stmt) -> None:
        """Append a statement; values it reaches twice become lets first (ir/share.py)."""
        if isinstance(stmt, ir.Let | ir.Update | ir.Sink):
            field_name = {ir.Let: "value", ir.Update: "score", ir.Sink: "logit"}[type(stmt)]
            lets, expr = share_repeated(getattr(stmt, field_name), self.fresh)
            self.scopes[-1].extend(lets)
            if lets:
                stmt = dataclasses.replace(stmt, **{field_name: expr})
        self.scopes[-1].append(stmt)

    def fresh(self, base: str) -> str:
        """A name not used yet, `base` itself when free."""
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}{i}", i + 1
        self.names.add(name)
        return name

    def declare_input(self, name: str, in_mod: bool) -> None:
        """Note who reads the input `name` by name: the kernel, or a user's mod through
        attnc.input / attnc.scalar. A mod's own input named like one of the kernel's (its `scale`,
        `k`, `bias`) would silently read the kernel's: a TraceError at the mod's declaration."""
        mine, other = (self.mod_inputs, self.kernel_inputs) if in_mod else (self.kernel_inputs, self.mod_inputs)
        if name in other or (in_mod and name in self.params and name not in self.mod_inputs):
            span = self.mod_inputs.get(name) if not in_mod else None
            raise TraceError(f"attnc.input/attnc.scalar {name!r} in a mod names the kernel's own input {name!r}: "
                             "a mod's inputs need names of their own", span or user_span())
        mine.setdefault(name, user_span())

    def add_param(self, name: str, ty: ir.TensorType, span: Span | None = None) -> None:
        old = self.params.get(name)
        if old is not None and old.type != ty:
            raise fail(f"input {name!r} used with two types: {old.type} and {ty}")
        if old is None:
            if name in self.names:
                raise fail(f"input name {name!r} clashes with another name in the kernel")
            self.params[name] = ir.Param(name, ty, span or user_span())
            self.names.add(name)
