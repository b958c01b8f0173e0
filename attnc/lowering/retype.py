"""The storage-dtype passes: store the attention operands as f16 while all math stays f32, or
K and V in a quantized format (attnc/quant.py) read through their dequantization."""

from __future__ import annotations

from attnc.errors import LoweringError
from attnc.ir import nodes as ir
from attnc.ir.verify import verify
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
                   if p.name in ops and p.type.dtype in (ir.DType.F32, ir.DType.F16) else p for p in kernel.params)
    out = ir.TensorType(ir.DType.F16, kernel.output.dims)
    return ir.Kernel(kernel.name, params, out, kernel.tunables, kernel.body, kernel.span)


def kv_tensors(kernel: ir.Kernel) -> tuple[str, str]:
    """(K, V): the tensor the dot's second slice reads and the tensor the update's value slice reads."""
    k = v = None
    lets = [s.value for s in ir.walk_stmts(kernel.body) if isinstance(s, ir.Let)]
    for s in ir.walk_stmts(kernel.body):
        if isinstance(s, ir.Update):
            v = s.value.tensor
            lets.append(s.score)
    for e in lets:
        for x in ir.walk_expr(e):
            if isinstance(x, ir.Dot):
                k = x.b.tensor
    if k is None or v is None:
        raise LoweringError("the kernel has no dot(q, k) score or update with a value slice to store quantized")
    return k, v


def with_kv_formats(kernel: ir.Kernel, k_format: str | None, v_format: str | None) -> ir.Kernel:
    """The kernel with its K and/or V tensor typed as a quantized storage format (q8_0, q4_0,
    int8; None leaves the tensor as it is)."""
    if k_format is None and v_format is None:
        return kernel
    k, v = kv_tensors(kernel)
    want: dict[str, ir.DType] = {}
    for name, fmt in ((k, k_format), (v, v_format)):
        if fmt is not None:
            dt = ir.DType(fmt)
            if not dt.is_quant:
                raise LoweringError(f"{fmt!r} is not a quantized format (q8_0, q4_0, int8)")
            if want.setdefault(name, dt) is not dt:
                raise LoweringError(f"K and V are the same tensor {name!r}; it cannot be both {want[name].value} "
                                    f"and {fmt}")
    params = tuple(ir.Param(p.name, ir.TensorType(want[p.name], p.type.dims), p.span) if p.name in want else p
                   for p in kernel.params)
    out = ir.Kernel(kernel.name, params, kernel.output, kernel.tunables, kernel.body, kernel.span)
    verify(out)
    return out
