"""The storage-dtype pass: store the attention operands as f16 while all math stays f32."""

from __future__ import annotations

from attnc.ir import nodes as ir
from attnc.lowering.plan import Storage


def operand_tensors(kernel: ir.Kernel) -> set[str]:
    """The tensors read by the dot and by the update's value slice (q, k, v)."""
    lets = {s.var: s.value for s in ir.walk_stmts(kernel.body) if isinstance(s, ir.Let)}
    exprs = list(lets.values())
    names = set()
    for s in ir.walk_stmts(kernel.body):
        if isinstance(s, ir.Update):
            names.add(s.value.tensor)
            exprs.append(s.score)
    for e in exprs:
        for x in ir.walk_expr(e):
            if isinstance(x, ir.Dot):
                names.update({x.a.tensor, x.b.tensor})
    return names


def retype(kernel: ir.Kernel, storage: Storage) -> ir.Kernel:
    """The kernel with q/k/v and the output typed f16 when `storage` is F16, else unchanged."""
    if storage is Storage.F32:
        return kernel
    ops = operand_tensors(kernel)
    params = tuple(ir.Param(p.name, ir.TensorType(ir.DType.F16, p.type.dims), p.span)
                   if p.name in ops and p.type.dtype.is_float else p for p in kernel.params)
    out = ir.TensorType(ir.DType.F16, kernel.output.dims)
    return ir.Kernel(kernel.name, params, out, kernel.tunables, kernel.body, kernel.span)
