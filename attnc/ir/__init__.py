"""The attnc IR: nodes (semantics in `nodes`' docstring), verifier, printer and reference interpreter.

This package imports nothing from `attnc.frontend`, `attnc.lowering` or `attnc.runtime`.
"""

from attnc.ir.nodes import (
    Call,
    Const,
    Dim,
    DimExtent,
    Dot,
    DType,
    Expr,
    Grid,
    GridAxis,
    Kernel,
    Let,
    Load,
    Loop,
    Op,
    Param,
    Return,
    Sink,
    Slice,
    Softmax,
    SplitExtent,
    Stmt,
    TensorType,
    TileExtent,
    Update,
    Var,
)

__all__ = [
    "Call", "Const", "Dim", "DimExtent", "Dot", "DType", "Expr", "Grid", "GridAxis", "Kernel",
    "Let", "Load", "Loop", "Op", "Param", "Return", "Sink", "Slice", "Softmax", "SplitExtent",
    "Stmt", "TensorType", "TileExtent", "Update", "Var",
]
