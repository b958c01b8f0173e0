"""Lowering: verified IR + Plan -> WGSL Programs (the main pass, and the split-KV combine)."""

from __future__ import annotations

from attnc.ir import nodes as ir
from attnc.lowering.analyze import FlashSpec, analyze
from attnc.lowering.flash import Shader, emit_combine, emit_main
from attnc.lowering.plan import Dialect, Family, Plan, Storage, layout
from attnc.lowering.program import Program

__all__ = ["Dialect", "Family", "Plan", "Program", "Storage", "lower", "analyze", "FlashSpec"]


def lower(kernel: ir.Kernel, plan: Plan) -> tuple[Program, ...]:
    """Lower a verified kernel for a plan: the programs to dispatch, in order."""
    spec = analyze(kernel)
    sh = Shader(spec, plan, layout(plan, spec.BM, spec.BN))
    progs = [emit_main(sh)]
    if spec.split_var is not None:
        progs.append(emit_combine(sh))
    return tuple(progs)
