"""Lowering: verified IR + Plan -> WGSL Programs (the main pass, the block map of a mask that reads
data before it, the split-KV combine after it)."""

from __future__ import annotations

from attnc.errors import LoweringError
from attnc.ir import nodes as ir
from attnc.lowering.analyze import FlashSpec, analyze
from attnc.lowering.blocks import block_mask, emit_classify, emit_compact
from attnc.lowering.combine import emit_combine
from attnc.lowering.lanes import emit_lanes
from attnc.lowering.plan import Dialect, Family, Plan, Storage, Strategy, check_lanes, check_rows, layout
from attnc.lowering.program import Program
from attnc.lowering.rows import emit_rows
from attnc.lowering.shader import Shader
from attnc.lowering.stream import emit_stream
from attnc.lowering.tiled import emit_main

__all__ = ["Dialect", "Family", "Plan", "Program", "Storage", "Strategy", "lower", "analyze", "FlashSpec"]


def lower(kernel: ir.Kernel, plan: Plan) -> tuple[Program, ...]:
    """Lower a verified kernel for a plan: the programs to dispatch, in order."""
    spec = analyze(kernel)
    if kernel.output.dtype is ir.DType.F16 and plan.storage is Storage.F32:
        raise LoweringError("a float16 output is written by f16-storage plans (F16 or F16A), not an F32 one",
                            kernel.span)
    quantized = sorted(p.name for p in spec.tensors if p.type.dtype.is_quant)
    if plan.storage is Storage.F16A and quantized:
        raise LoweringError(f"F16A plans stage K and V in f16 workgroup tiles, which would round the values of the "
                            f"quantized {', '.join(quantized)} (d * q: up to 19 bits); quantized K/V take F16 storage")
    if plan.strategy is Strategy.ROWS:
        if plan.storage is Storage.F16A:
            raise LoweringError("f16 tiles (F16A) are a tiled-strategy variant")
        if plan.family is not Family.PORTABLE:
            raise LoweringError("the rows strategy has no cross-invocation reductions: use the portable family")
        check_rows(plan)
        sh = Shader(spec, plan, None)
        progs = [emit_rows(sh)]
    elif plan.strategy is Strategy.LANES:
        check_lanes(plan, spec.BM)
        sh = Shader(spec, plan, None)
        sh.block_mask = block_mask(spec) if plan.block_map else None
        progs = [emit_lanes(sh)]
    elif plan.strategy is Strategy.STREAM:
        if plan.storage is Storage.F16A:
            raise LoweringError("f16 tiles (F16A) are a tiled-strategy variant")
        sh = Shader(spec, plan, None)
        sh.block_mask = block_mask(spec) if plan.block_map else None
        progs = [emit_stream(sh)]
    else:
        sh = Shader(spec, plan, layout(plan, spec.BM, spec.BN))
        sh.block_mask = block_mask(spec) if plan.block_map else None
        progs = [emit_main(sh)]
    if sh.block_mask is not None:  # the live KV tiles first (lowering/blocks.py)
        progs = [emit_classify(sh, sh.block_mask), emit_compact(sh, sh.block_mask), *progs]
    if spec.split_var is not None:
        progs.append(emit_combine(sh))
    return tuple(progs)
