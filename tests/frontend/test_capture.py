"""What score_mod and mask_mod read besides their arguments (frontend/capture.py): where captured
values are found, what they become in the IR, the cache key, constants and the errors."""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import pytest

import attnc
from attnc.errors import TraceError
from attnc.frontend import capture
from attnc.frontend.parser import parse
from attnc.ir import nodes as ir
from attnc.ir.interp import interpret
from attnc.ir.printer import print_kernel
from attnc.kernels.flash import flash_attention
from attnc.runtime import build
from tests.textbook import attention_ref, capture_dtypes

GLOBAL_TABLE = np.arange(12, dtype=np.float32).reshape(3, 4)
GLOBAL_SCALE = 0.25


def global_helper(i):
    return GLOBAL_TABLE[i % 3, 1]


def params(k: ir.Kernel) -> dict[str, ir.TensorType]:
    return {p.name: p.type for p in k.params}


def mod_of(k: ir.Kernel, var: str = "mod") -> ir.Expr:
    return next(s.value for s in ir.walk_stmts(k.body) if isinstance(s, ir.Let) and s.var == var)


def test_closures_defaults_globals_partials_and_containers_become_params():
    rel = np.zeros(4, np.float32)
    doc = np.zeros((2, 9), np.int64)
    pair = (np.zeros(3, np.uint8), np.zeros(3, np.bool_))

    def score_mod(s, b, h, q, kv, gate=np.ones(4, np.float16)):  # noqa: B008 - a default argument is captured too
        return s * GLOBAL_SCALE + rel[h] + gate[h] + global_helper(q) + attnc.f32(pair[0][kv])

    def masked(b, h, q, kv, lengths):
        return (doc[b, q] == doc[b, kv]) & pair[1][kv] & (kv < lengths[b])

    k, caps = flash_attention.trace_with_captures(
        score_mod=score_mod, mask_mod=functools.partial(masked, lengths=np.array([3, 4], np.int32)))
    ps = params(k)
    assert ps["rel"] == ir.TensorType(ir.DType.F32, ("rel_0",))
    assert ps["gate"].dtype is ir.DType.F16
    assert ps["GLOBAL_TABLE"].dims == ("GLOBAL_TABLE_0", "GLOBAL_TABLE_1")
    assert ps["GLOBAL_SCALE"] == ir.TensorType(ir.DType.F32, ())
    assert ps["doc"].dtype is ir.DType.I32  # int64 arrays are bound as i32
    assert ps["pair_0"].dtype is ir.DType.U8 and ps["pair_1"].dtype is ir.DType.BOOL
    assert ps["lengths"].dtype is ir.DType.I32
    assert caps["rel"].obj is rel and caps["lengths"].path == ("mask_mod", "kw", "lengths")
    assert caps["GLOBAL_TABLE"].path == ("score_mod", "global", "global_helper", "global", "GLOBAL_TABLE")
    text = print_kernel(k)
    assert "rel: f32[rel_0]" in text and "pair_1: bool[pair_1_0]" in text
    assert parse(text) == k


def test_the_interpreter_runs_a_kernel_with_captures():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5, 2)).astype(np.float32)
    buckets = np.array([0, 4, 1, 3, 2, 2, 0, 1, 4], np.int32)

    def score_mod(s, b, h, q, kv):
        return s + table[buckets[kv - q + 4], h]

    k, caps = flash_attention.trace_with_captures(score_mod=score_mod)
    q = rng.standard_normal((1, 2, 5, 4))
    kk = rng.standard_normal((1, 2, 5, 4))
    v = rng.standard_normal((1, 2, 5, 3))
    o, _ = interpret(k, {"q": q, "k": kk, "v": v, "scale": 0.5, **{n: s.obj for n, s in caps.items()}})
    s = np.einsum("bhid,bhjd->bhij", q, kk) * 0.5
    i, j = np.arange(5)[:, None], np.arange(5)[None]
    s = s + table[buckets[j - i + 4]].transpose(2, 0, 1)[None]
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(o, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-12)


def test_one_array_read_by_both_mods_is_one_param_and_unused_values_are_none():
    doc = np.zeros(8, np.int32)
    unused = np.zeros(3, np.float32)
    number = 3

    def score_mod(s, b, h, q, kv):
        x = unused  # noqa: F841 - reached but never indexed: not a param
        return s + attnc.f32(doc[q])

    k = flash_attention.trace(score_mod=score_mod, mask_mod=lambda b, h, q, kv: doc[q] == doc[kv] + number)
    names = [p.name for p in k.params]
    assert names.count("doc") == 1 and "unused" not in names and "number" in names


def test_cache_key_changes_with_structure_not_values():
    def make(table, scale, flag, shift):
        def score_mod(s, b, h, q, kv):
            return (s + table[h] * scale if flag else s) + shift
        return {"score_mod": score_mod}

    key = capture.scan(make(np.zeros(4, np.float32), 0.5, True, 1)).key
    assert key is not None
    assert capture.scan(make(np.ones(4, np.float32), 2.5, True, 7)).key == key  # new values
    assert capture.scan(make(np.zeros(5, np.float32), 0.5, True, 1)).key != key  # a shape
    assert capture.scan(make(np.zeros(4, np.float64), 0.5, True, 1)).key == key  # f64 binds as f32
    assert capture.scan(make(np.zeros(4, np.int32), 0.5, True, 1)).key != key  # a dtype
    assert capture.scan(make(np.zeros(4, np.float32), 0.5, False, 1)).key != key  # a constant flag
    def lam(t):
        return {"mask_mod": lambda *_: t[0] > t[1]}
    assert capture.scan(lam(np.zeros(4))).key == capture.scan(lam(np.ones(4))).key  # one code
    assert capture.scan({"m": lambda *_: [1][0]}).key is not None
    unhashable = {1, 2}  # a set: not searched, not hashable
    assert capture.scan({"m": lambda *_: unhashable}).key is None  # traced at every call


def test_aliasing_of_captured_arrays_is_part_of_the_key():
    t1, t2 = np.zeros(4, np.float32), np.zeros(4, np.float32)

    def make(a, b):
        return {"score_mod": lambda s, bb, h, q, kv: s + a[h] + b[h]}
    assert capture.scan(make(t1, t1)).key != capture.scan(make(t1, t2)).key
    assert len(params(flash_attention.trace(**make(t1, t1)))) == len(params(flash_attention.trace(**make(t1, t2)))) - 1


def test_numbers_used_as_python_values_become_constants():
    def make(n, w):
        def score_mod(s, b, h, q, kv):
            out = s
            for _ in range(n):  # n drives Python control flow
                out = out * math.exp(w) + 1.0  # math.exp needs a Python float
            return out
        return score_mod

    k = flash_attention.trace(score_mod=make(2, 0.5))
    assert [p.name for p in k.params if not p.type.dims] == ["scale"]  # both became constants
    expect = math.exp(0.5)
    consts = [x.value for x in ir.walk_expr(mod_of(k)) if isinstance(x, ir.Const)]
    assert consts.count(pytest.approx(expect)) == 2
    # later scans know: the constant's value is now in the key
    assert capture.scan({"score_mod": make(2, 0.5)}).key != capture.scan({"score_mod": make(3, 0.5)}).key
    assert capture.scan({"score_mod": make(2, 0.5)}).key != capture.scan({"score_mod": make(2, 0.7)}).key


def test_sub_tensors_negative_indices_and_shapes():
    bias = np.zeros((4, 2, 3, 5), np.float32)
    which = np.array(2)

    def score_mod(s, b, h, q, kv):
        assert bias.shape == (4, 2, 3, 5) and bias.ndim == 4 and len(bias) == 4
        return s + bias[0][b, h][which] + bias[-1, b, h, -2]

    k = flash_attention.trace(score_mod=score_mod)
    loads = [x for x in ir.walk_expr(mod_of(k)) if isinstance(x, ir.Load)]
    assert loads[0].index[0] == ir.Const(0, ir.DType.I32)
    assert loads[0].index[3] == ir.Var("which", ir.DType.I32)  # a 0-d array: a uniform
    assert loads[1].index[0] == ir.Call(ir.Op.ADD, (ir.Dim("bias_0"), ir.Const(-1, ir.DType.I32)), ir.DType.I32)


def test_captured_names_yield_to_the_kernels_names_and_displace_its_lets():
    q = np.zeros(3, np.float32)  # the kernel has a param q and a dim B
    B = np.zeros(3, np.float32)
    keep = np.ones(3, bool)  # the flash kernel has a %keep let: the let is renamed

    def score_mod(s, b, h, qi, kv):
        return s + q[qi] + B[kv]

    k = flash_attention.trace(score_mod=score_mod, mask_mod=lambda b, h, qi, kv: keep[kv], causal=True)
    names = [p.name for p in k.params]
    assert names[:3] == ["q", "k", "v"] and "q1" in names and "B1" in names and "keep" in names
    lets = {s.var for s in ir.walk_stmts(k.body) if isinstance(s, ir.Let)}
    assert "keep" not in lets and "keep1" in lets
    assert parse(print_kernel(k)) == k


@pytest.mark.parametrize("fn, message", [
    (lambda s, b, h, q, kv: s + np.zeros(3, np.complex64)[h], "only captured arrays can be indexed"),
    (lambda s, b, h, q, kv: s + CAPTURED_COMPLEX[h], "has dtype complex64: a kernel cannot read it"),
    (lambda s, b, h, q, kv: s + HOLDER.table[h], "only captured arrays can be indexed"),
    (lambda s, b, h, q, kv: s + GLOBAL_TABLE[h], "'GLOBAL_TABLE' of shape (3, 4) has 2 dims, indexed with 1"),
    (lambda s, b, h, q, kv: s + GLOBAL_TABLE[h, q, kv], "'GLOBAL_TABLE' of shape (3, 4) has 2 dims, indexed with 3"),
    (lambda s, b, h, q, kv: s + GLOBAL_TABLE[h, :], "is indexed with one integer per axis"),
    (lambda s, b, h, q, kv: s + GLOBAL_TABLE.sum(), "has no 'sum' in a kernel"),
    (lambda s, b, h, q, kv: s + np.exp(GLOBAL_TABLE[h, 0]), "numpy's exp cannot take a traced value"),
    (lambda s, b, h, q, kv: s + GLOBAL_TABLE[q > 1, 0], "tensor indices must be i32"),
    (lambda s, b, h, q, kv: s + GLOBAL_TABLE[0.5, 0], "tensor indices must be i32"),
])
def test_misuse_is_a_trace_error_at_the_users_line(fn, message):
    with pytest.raises(TraceError) as e:
        flash_attention.trace(score_mod=fn)
    assert message in e.value.message, e.value.message
    assert e.value.span is not None and e.value.span.file == __file__


class _Holder:
    table = np.zeros(4, np.float32)


HOLDER = _Holder()
CAPTURED_COMPLEX = np.zeros(3, np.complex64)


def test_bool_equality_in_masks_and_the_new_functions():
    seq = np.zeros(8, bool)

    def mask_mod(b, h, q, kv):
        return (seq[q] == seq[kv]) & ((q > kv) != (kv > 3))

    def score_mod(s, b, h, q, kv):
        x = attnc.f32(q)
        return (s.sin() + attnc.cos(x) + attnc.tan(s) + attnc.exp2(s) + attnc.log2(abs(s) + 1)
                + attnc.floor(s) + s.ceil() + attnc.sigmoid(s) + attnc.f32(math.floor(s * 2)) + s ** 2)

    k = flash_attention.trace(score_mod=score_mod, mask_mod=mask_mod)
    ops = {x.op for s in ir.walk_stmts(k.body) if isinstance(s, ir.Let) for x in ir.walk_expr(s.value)
           if isinstance(x, ir.Call)}
    assert {ir.Op.SIN, ir.Op.COS, ir.Op.TAN, ir.Op.EXP2, ir.Op.LOG2, ir.Op.FLOOR, ir.Op.CEIL,
            ir.Op.SIGMOID, ir.Op.EQ, ir.Op.NE, ir.Op.I32} <= ops
    assert parse(print_kernel(k)) == k


class ForeignTensor:
    """A CPU tensor of another library as attnc sees one (a PyTorch CPU tensor in FlexAttention's
    own tests): shape, a dtype that is not numpy's, `__array__`, and indexing that returns more
    foreign tensors rather than numbers."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.dtype = f"foreign.{data.dtype}"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._data if dtype is None else self._data.astype(dtype)

    def __getitem__(self, index):
        return ForeignTensor(np.asarray(self._data[index]))

    def __floordiv__(self, other: int) -> ForeignTensor:
        return ForeignTensor(self._data // other)


def test_cpu_tensors_of_other_libraries_are_captured_like_arrays():
    """Objects numpy converts, with shape and dtype (a PyTorch CPU tensor, as in FlexAttention's
    own tests, or any such class), are captured as tensors; the runtime binds them with numpy."""
    head_offset = ForeignTensor(np.random.default_rng(0).random(4, dtype=np.float32))
    doc = ForeignTensor(np.arange(10, dtype=np.int64)) // 3
    k, caps = flash_attention.trace_with_captures(score_mod=lambda s, b, h, q, kv: s * head_offset[h],
                                                  mask_mod=lambda b, h, q, kv: doc[q] == doc[kv])
    ps = params(k)
    assert ps["head_offset"].dtype is ir.DType.F32 and ps["doc"] == ir.TensorType(ir.DType.I32, ("doc_0",))
    assert caps["doc"].obj is doc and caps["doc"].shape == (10,)


WAY_NUMBER = 1.0  # set by the test below, call by call
WAY_TABLE = np.zeros(2, np.float32)


def _through_globals(s, h):
    return s * WAY_NUMBER + WAY_TABLE[h]


def _by_position(c, t, s, b, h, q, kv):
    return s * c + t[h]


def _by_keyword(s, b, h, q, kv, *, c, t):
    return s * c + t[h]


def _reaching(c, t) -> dict:
    """A score_mod `s * c + t[h]` for each place the module docstring lists where a mod finds a
    number `c` and an array `t`: made anew for each call, as an application's closures are."""
    def cell(s, b, h, q, kv):
        return s * c + t[h]

    def default(s, b, h, q, kv, c=c, t=t):
        return s * c + t[h]

    def kwdefault(s, b, h, q, kv, *, c=c, t=t):
        return s * c + t[h]

    def helper(x, h):
        return x * c + t[h]

    pair, items, named = (c, t), [c, t], {"c": c, "t": t}
    return {
        "closure cell": cell,
        "positional default": default,
        "keyword-only default": kwdefault,
        "cell of a helper in a cell": lambda s, b, h, q, kv: helper(s, h),
        "global": lambda s, b, h, q, kv: s * WAY_NUMBER + WAY_TABLE[h],
        "global of a helper in the module": lambda s, b, h, q, kv: _through_globals(s, h),
        "partial argument": functools.partial(_by_position, c, t),
        "partial keyword": functools.partial(_by_keyword, c=c, t=t),
        "tuple": lambda s, b, h, q, kv: s * pair[0] + pair[1][h],
        "list": lambda s, b, h, q, kv: s * items[0] + items[1][h],
        "dict": lambda s, b, h, q, kv: s * named["c"] + named["t"][h],
    }


@pytest.mark.parametrize("way", list(_reaching(1.0, WAY_TABLE)))
def test_every_place_a_mod_reads_a_value_from_gives_each_call_its_value(way, monkeypatch):
    """A number and an array reached each way a mod can reach them, new values at each call,
    through the runtime's kernel cache and the interpreter: each call computes with its own
    values, from one trace (keyword-only defaults were not searched: a number there was baked
    into the first call's kernel, which later calls with other numbers reused, and an array
    there was a TraceError)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, n, 4)) for n in (3, 5, 5))
    traces = build._CACHE.traces
    for c in (0.5, 2.0, -1.5):
        t = rng.standard_normal(2).astype(np.float32)
        monkeypatch.setattr(sys.modules[__name__], "WAY_NUMBER", c)
        monkeypatch.setattr(sys.modules[__name__], "WAY_TABLE", t)
        kern, captured, _ = build.build_kernel_with_captures(build.Options(score_mod=_reaching(c, t)[way]),
                                                              {"BM": 16, "BN": 16})
        o, _ = interpret(kern, {"q": q, "k": k, "v": v, "scale": 0.5, **captured})
        ref = attention_ref(q, k, v, scale=0.5, score_mod=lambda s, b, h, i, j, c=c, t=t: s * c + t[h])
        np.testing.assert_allclose(o, ref, rtol=1e-6, atol=1e-6, err_msg=f"{way}, c={c}")
    assert build._CACHE.traces == traces + 1, way  # new values: new bindings and uniforms, one kernel


def test_every_dtype_the_api_table_lists_is_bound_and_read_as_it_says():
    """Each numpy dtype of docs/API.md's capture table, captured by a mod: its param has the
    dtype the table stores it as, its reads the dtype the table says the kernel reads (uint16,
    in the table, was missing from the dtypes bound as i32: a TraceError); a dtype not in the
    table is unsupported."""
    table = capture_dtypes()
    assert {"float32", "float16", "int32", "uint32", "uint8", "bool"} <= set(table)  # the table was read
    stored = {"f32": ir.DType.F32, "f16": ir.DType.F16, "i32": ir.DType.I32, "u32": ir.DType.U32}
    for name, (read_as, stored_as) in table.items():
        x = np.zeros(4, name)
        want = ir.DType.BOOL if name == "bool" else ir.DType.U8 if stored_as.startswith("one byte") else \
            stored[stored_as.split(",")[0]]
        assert capture.ir_dtype(x.dtype) is want, name
        if name == "bool":
            k = flash_attention.trace(mask_mod=lambda b, h, q, kv, x=x: x[h])
        else:
            k = flash_attention.trace(score_mod=lambda s, b, h, q, kv, x=x: s + attnc.f32(x[h]))
        assert params(k)["x"] == ir.TensorType(want, ("x_0",)), name
        loads = {e.dtype for s in ir.walk_stmts(k.body) if isinstance(s, ir.Let) for e in ir.walk_expr(s.value)
                 if isinstance(e, ir.Load) and e.tensor == "x"}
        assert loads == {ir.DType(read_as)}, name
    for name in ("complex64", "longdouble", "datetime64[s]", "U3", "object"):
        if np.dtype(name).name not in table:
            assert capture.ir_dtype(name) is None, name
