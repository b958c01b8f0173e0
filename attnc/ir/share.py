"""Name repeated sub-expressions: a traced value used twice becomes one let, not two copies.

Tracing builds expressions as Python objects, so `x = s * 0.5 + s * 0.5` repeated n times is a
graph of 3n nodes whose tree form (the text, every pass that walks it, the WGSL) has 2^n. This
pass finds the calls and loads an expression reaches more than once (by identity) and binds
each to a let, in dependency order, so the kernel stays linear in what the user wrote.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from attnc.ir.nodes import Call, Dot, Expr, Let, Load, Slice, Var

Shareable = Call | Load


def _children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Call):
        return e.args
    if isinstance(e, Load):
        return e.index
    if isinstance(e, Dot):
        return tuple(i for sl in (e.a, e.b) for i in sl.index if i is not None)
    return ()


def _references(root: Expr) -> Counter[int]:
    """How many parents each node of the graph under `root` has (root counted once)."""
    refs: Counter[int] = Counter({id(root): 1})
    seen = {id(root)}
    stack = [root]
    while stack:
        for c in _children(stack.pop()):
            refs[id(c)] += 1
            if id(c) not in seen:
                seen.add(id(c))
                stack.append(c)
    return refs


def share_repeated(root: Expr, fresh: Callable[[str], str]) -> tuple[list[Let], Expr]:
    """Lets for the calls and loads `root` reaches more than once, in dependency order, and
    `root` rewritten to read them; `fresh` gives each let an unused name."""
    refs = _references(root)
    if all(n == 1 for n in refs.values()):
        return [], root
    lets: list[Let] = []
    done: dict[int, Expr] = {}

    def rebuild(e: Expr) -> Expr:
        key = id(e)
        if key in done:
            return done[key]
        if isinstance(e, Call):
            out: Expr = dataclasses.replace(e, args=tuple(rebuild(a) for a in e.args))
        elif isinstance(e, Load):
            out = dataclasses.replace(e, index=tuple(rebuild(i) for i in e.index))
        elif isinstance(e, Dot):
            out = dataclasses.replace(e, a=_slice(e.a), b=_slice(e.b))
        else:
            out = e
        if isinstance(e, Shareable) and refs[key] > 1 and e is not root:
            name = fresh("t")
            lets.append(Let(name, out, e.span))
            out = Var(name, e.dtype, e.span)
        done[key] = out
        return out

    def _slice(sl: Slice) -> Slice:
        return dataclasses.replace(sl, index=tuple(None if i is None else rebuild(i) for i in sl.index))

    return lets, rebuild(root)
