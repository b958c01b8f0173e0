"""The IR reference interpreter (the oracle of every GPU test) against the textbook formula.

No GPU: the shipped flash kernel is traced for every option combination, interpreted in
float64, and compared with tests/textbook.py to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.ir.interp import interpret
from attnc.kernels.flash import flash_attention
from tests.strategies import sink_values
from tests.textbook import assert_close, attention_ref, rel_err

TOL = 1e-12


@st.composite
def problems(draw, split=None, special_sinks=False):
    """A shape, an option set, tunables and the inputs for both the interpreter and textbook;
    with `special_sinks`, sinks always, each head's drawn with +-inf, NaN and huge values."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    S = draw(st.integers(1, 12))
    T = draw(st.integers(1, 40))
    D = draw(st.integers(1, 9))
    Dv = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    opts = dict(
        causal=draw(st.booleans()),
        window=draw(st.none() | st.tuples(st.none() | st.integers(0, 20), st.none() | st.integers(0, 20))),
        softcap=draw(st.booleans()),
        alibi=draw(st.booleans()),
        bias=draw(st.booleans()),
        sinks=special_sinks or draw(st.booleans()),
        kv_lens=draw(st.booleans()),
        lse=draw(st.booleans()),
        split=draw(st.booleans()) if split is None else split,
    )
    tun = dict(BM=draw(st.sampled_from([1, 2, 4, 8, 32])), BN=draw(st.sampled_from([1, 3, 8, 16, 64])))
    q = rng.standard_normal((B, Hq, S, D))
    k = rng.standard_normal((B, Hkv, T, D))
    v = rng.standard_normal((B, Hkv, T, Dv))
    scale = float(draw(st.sampled_from([None, 0.5, 1.0, 2.0])) or 1.0 / np.sqrt(D))
    args: dict[str, object] = dict(q=q, k=k, v=v, scale=scale)
    ref: dict[str, object] = dict(scale=scale, causal=opts["causal"], return_lse=True)
    if opts["split"]:
        args["NSPLIT"] = draw(st.integers(1, 6))
    if opts["window"] is not None:
        left, right = opts["window"]
        ref["window"] = (left, right)
        if left is not None:
            args["window_left"] = left
        if right is not None:
            args["window_right"] = right
        opts["window"] = tuple(None if w is None else 0 for w in opts["window"])
    if opts["softcap"]:
        args["softcap"] = ref["softcap"] = draw(st.sampled_from([0.5, 2.0, 30.0]))
    if opts["alibi"]:
        args["alibi_slopes"] = ref["alibi_slopes"] = rng.uniform(-1, 1, Hq)
    if opts["bias"]:
        shape = draw(st.sampled_from([(T,), (S, T), (1, Hq, 1, T), (B, 1, S, 1), (B, Hq, S, T)]))
        bias = rng.standard_normal(shape)
        ref["bias"] = bias
        args["bias"] = np.broadcast_to(bias, (B, Hq, S, T))
    if opts["sinks"]:
        args["sinks"] = ref["sinks"] = (np.array([draw(sink_values()) for _ in range(Hq)]) if special_sinks
                                        else rng.uniform(-2, 2, Hq))
    if opts["kv_lens"]:
        lens = np.array([draw(st.sampled_from([0, T, draw(st.integers(0, T))])) for _ in range(B)])
        args["kv_lens"] = ref["kv_lens"] = lens
    return opts, tun, args, ref


def run_interp(opts, tun, args):
    kern = flash_attention.trace(**opts, **tun)
    return interpret(kern, args)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_interpreter_matches_textbook(problem) -> None:
    opts, tun, args, ref = problem
    o, lse = run_interp(opts, tun, args)
    o_ref, lse_ref = attention_ref(args["q"], args["k"], args["v"], **ref)
    assert not np.isnan(o).any()
    assert_close(o, o_ref, TOL, "o")
    if opts["lse"]:
        assert lse is not None
        assert_close(lse, lse_ref, TOL, "lse")
    else:
        assert lse is None


@settings(max_examples=60, deadline=None)
@given(problems(split=True))
def test_split_kv_matches_unsplit(problem) -> None:
    """The split-KV combine (any NSPLIT, also more splits than tiles) equals one pass."""
    opts, tun, args, ref = problem
    o, lse = run_interp(opts, tun, args)
    one = {n: a for n, a in args.items() if n != "NSPLIT"}
    o1, lse1 = run_interp({**opts, "split": False}, tun, one)
    assert_close(o, o1, TOL, "o")
    if opts["lse"]:
        assert_close(lse, lse1, TOL, "lse")


def _qkv(B=1, Hq=2, Hkv=1, S=5, T=7, D=4, Dv=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Hq, S, D)), rng.standard_normal((B, Hkv, T, D)),
            rng.standard_normal((B, Hkv, T, Dv)))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("case", ["kv_lens0", "window_excludes_all", "causal_s_gt_t"])
def test_fully_masked_rows_give_zero_and_neg_inf_lse(case: str, split: bool) -> None:
    q, k, v = _qkv(B=2, S=6, T=4)
    B, Hq, S, T = 2, 2, 6, 4
    opts = dict(lse=True, split=split)
    args: dict[str, object] = dict(q=q, k=k, v=v, scale=0.5)
    ref: dict[str, object] = dict(scale=0.5, return_lse=True)
    if case == "kv_lens0":
        opts["kv_lens"] = True
        args["kv_lens"] = ref["kv_lens"] = np.array([0, T])
        masked = np.zeros((B, Hq, S), bool)
        masked[0] = True
    elif case == "window_excludes_all":
        # keys only strictly right of i_abs + 0 but the window is [i_abs - 0, i_abs + 0] shifted
        # out of range: with kv_lens = T, i_abs ranges over T-S..T-1 = -2..3, so rows 0, 1 see
        # only keys j in [i_abs, i_abs] = {-2}, {-1}: nothing
        opts["window"] = (0, 0)
        args["window_left"], args["window_right"] = 0, 0
        ref["window"] = (0, 0)
        masked = np.zeros((B, Hq, S), bool)
        masked[:, :, :2] = True
    else:
        opts["causal"] = True
        masked = np.zeros((B, Hq, S), bool)
        masked[:, :, : S - T] = True  # i_abs = i - 2 < 0 for i < 2
    if split:
        args["NSPLIT"] = 3
    o, lse = run_interp(opts, dict(BM=4, BN=2), args)
    o_ref, lse_ref = attention_ref(q, k, v, **{**ref, "causal": opts.get("causal", False)})
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert np.all(o[masked] == 0.0)
    assert np.all(np.isneginf(lse[masked]))
    assert np.all(np.isfinite(lse[~masked]))
    assert np.all(np.isneginf(lse_ref[masked])) and np.all(o_ref[masked] == 0.0)
    assert_close(o, o_ref, TOL, "o")
    assert_close(lse, lse_ref, TOL, "lse")


def test_fully_masked_row_with_sink_has_lse_of_the_sink() -> None:
    q, k, v = _qkv(B=1, S=3, T=4)
    sinks = np.array([0.25, -1.5])
    o, lse = run_interp(dict(kv_lens=True, sinks=True, lse=True), dict(BM=4, BN=4),
                        dict(q=q, k=k, v=v, scale=1.0, kv_lens=np.array([0]), sinks=sinks))
    assert np.all(o == 0.0)
    np.testing.assert_array_equal(lse[0], np.broadcast_to(sinks[:, None], (2, 3)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(special_sinks=True))
def test_special_sinks_follow_the_rule(problem) -> None:
    """sinks[h] = +inf: o = 0 and lse = +inf on all the head's rows (fully masked ones too);
    -inf: as without a sink; NaN: the head's rows NaN; finite ones, however large, finite
    results. Split or not, every option, against the textbook too."""
    opts, tun, args, ref = problem
    o, lse = run_interp({**opts, "lse": True}, tun, args)
    o_ref, lse_ref = attention_ref(args["q"], args["k"], args["v"], **ref)
    assert_close(o, o_ref, TOL, "o")
    assert_close(lse, lse_ref, TOL, "lse")
    z = np.asarray(args["sinks"])
    assert np.all(o[:, z == np.inf] == 0.0) and np.all(lse[:, z == np.inf] == np.inf)
    assert np.all(np.isnan(o[:, np.isnan(z)])) and np.all(np.isnan(lse[:, np.isnan(z)]))
    finite = ~np.isnan(z)
    assert not np.isnan(o[:, finite]).any() and not np.isnan(lse[:, finite]).any()
    assert np.all(np.isfinite(lse[:, np.isfinite(z)]))
    none = run_interp({**opts, "lse": True, "sinks": False}, tun, {n: a for n, a in args.items() if n != "sinks"})
    assert_close(o[:, z == -np.inf], none[0][:, z == -np.inf], TOL, "o (sink -inf)")
    assert_close(lse[:, z == -np.inf], none[1][:, z == -np.inf], TOL, "lse (sink -inf)")


def test_nan_in_one_query_row_propagates_to_that_row_only() -> None:
    q, k, v = _qkv(B=1, S=5, T=9)
    q[0, 1, 3, 2] = np.nan
    o, lse = run_interp(dict(causal=True, lse=True), dict(BM=2, BN=4),
                        dict(q=q, k=k, v=v, scale=0.5))
    bad = np.zeros(o.shape[:-1], bool)
    bad[0, 1, 3] = True
    assert np.all(np.isnan(o[bad])) and not np.isnan(o[~bad]).any()
    assert np.all(np.isnan(lse[bad])) and not np.isnan(lse[~bad]).any()
    o_ref, lse_ref = attention_ref(q, k, v, causal=True, scale=0.5, return_lse=True)
    assert_close(o, o_ref, TOL)
    assert_close(lse, lse_ref, TOL, "lse")


def relpos_dsl(s, b, h, q_idx, kv_idx):
    return s - 0.1 * attnc.f32(abs(q_idx - kv_idx))


def relpos_np(s, b, h, i, j):
    return s - 0.1 * np.abs(i - j)


def stripe_mask_dsl(b, h, q_idx, kv_idx):
    return (kv_idx % 3 != 1) | (h == 0)


def stripe_mask_np(b, h, i, j):
    return (j % 3 != 1) | (h == 0)


@settings(max_examples=40, deadline=None)
@given(S=st.integers(1, 9), T=st.integers(1, 30), causal=st.booleans(), seed=st.integers(0, 1000))
def test_score_mod_and_mask_mod_with_raw_query_index(S, T, causal, seed) -> None:
    """User mods get the RAW query row index (not i_abs); masks combine with causal."""
    q, k, v = _qkv(B=2, Hq=2, Hkv=2, S=S, T=T, D=5, Dv=4, seed=seed)
    opts = dict(causal=causal, score_mod=relpos_dsl, mask_mod=stripe_mask_dsl, lse=True)
    o, lse = run_interp(opts, dict(BM=4, BN=8), dict(q=q, k=k, v=v, scale=0.3))
    o_ref, lse_ref = attention_ref(q, k, v, causal=causal, scale=0.3, score_mod=relpos_np,
                                   mask_mod=stripe_mask_np, return_lse=True)
    assert_close(o, o_ref, TOL)
    assert_close(lse, lse_ref, TOL, "lse")


def test_rel_err_definition() -> None:
    a = np.array([[3.0, 4.0]])
    assert rel_err(a, a) == 0.0
    assert rel_err(np.zeros(2), np.array([3.0, 4.0])) == 1.0
    assert rel_err(np.array([3.0, 4.0]), np.zeros(2)) == 5.0  # ref norm 0: absolute
    assert np.isnan(rel_err(np.array([np.nan]), np.array([1.0])))


# ------------------------------------------------------------------ the IR's scalar semantics
def _lse_of(score_mod, S: int):
    """lse per query row of a one-key kernel whose score is score_mod's value (lse = the score),
    with the arrays score_mod captures."""
    kern, captured = flash_attention.trace_with_captures(score_mod=score_mod, lse=True)
    q, k, v = np.zeros((1, 1, S, 1)), np.zeros((1, 1, 1, 1)), np.ones((1, 1, 1, 1))
    _, lse = interpret(kern, {"q": q, "k": k, "v": v, "scale": 1.0, **{n: c.obj for n, c in captured.items()}})
    return lse[0, 0]


def test_integer_division_and_modulo_floor_like_python_with_zero_divisors():
    a = np.array([-7, 7, -7, 7, 0, 5, -5, -(2**31), 2**31 - 1], np.int32)
    b = np.array([2, -2, -2, 2, 0, 0, 0, -1, 2], np.int32)
    div = _lse_of(lambda s, bb, h, i, j: attnc.f32(a[i] // b[i]), len(a))
    mod = _lse_of(lambda s, bb, h, i, j: attnc.f32(a[i] % b[i]), len(a))
    assert div.tolist() == [-4, -4, 3, 3, 0, 0, 0, -(2**31), 2**30 - 1]  # i32 min // -1 wraps
    assert mod.tolist() == [1, -1, -1, 1, 0, 5, -5, 0, 1]


def test_i32_arithmetic_wraps_and_conversions_saturate():
    x = np.array([2**30, -(2**30), 3], np.int32)
    wrapped = _lse_of(lambda s, b, h, i, j: attnc.f32(x[i] * 4 + 1), 3)
    assert wrapped.tolist() == [1, 1, 13]
    f = np.array([3.9, -3.9, 1e20, -1e20, np.nan], np.float32)
    conv = _lse_of(lambda s, b, h, i, j: attnc.f32(attnc.i32(f[i])), 5)
    assert conv.tolist() == [3, -3, 2**31 - 1, -(2**31), 0]


def test_reads_are_clamped_into_the_tensor():
    t = np.array([10.0, 20.0, 30.0])
    got = _lse_of(lambda s, b, h, i, j: t[i * 2 - 3], 5)
    assert got.tolist() == [10.0, 10.0, 20.0, 30.0, 30.0]


def test_float_functions_and_bool_equality():
    x = np.array([-2.5, -0.5, 0.0, 0.5, 2.5, 800.0, -800.0])
    fs = {"floor": np.floor, "ceil": np.ceil, "sin": np.sin, "cos": np.cos, "tan": np.tan,
          "exp2": np.exp2, "sigmoid": lambda z: 1 / (1 + np.exp(-z))}
    for name, ref in fs.items():
        fn = getattr(attnc, name)
        with np.errstate(over="ignore"):
            want = ref(x)
        np.testing.assert_allclose(_lse_of(lambda s, b, h, i, j, fn=fn: fn(x[i]), len(x)), want, rtol=1e-15,
                                   err_msg=name)
    flags = np.array([True, False, True])
    eq = _lse_of(lambda s, b, h, i, j: attnc.where(flags[i] == (i > 0), 1.0, 0.0), 3)
    assert eq.tolist() == [0.0, 0.0, 1.0]


# ------------------------------------------------------------------ non-finite K/V at masked keys
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("case", "bad"), [(c, x) for c in ("kv_lens", "causal", "window", "mask_mod")
                                           for x in (np.nan, np.inf, -np.inf)] + [("nan_row", np.nan)],
                         ids=[f"{c}-{x}" for c in ("kv_lens", "causal", "window", "mask_mod")
                              for x in ("nan", "inf", "-inf")] + ["nan_row"])
def test_non_finite_k_and_v_at_masked_keys_reach_only_the_rows_that_see_them(case: str, bad: float,
                                                                             split: bool) -> None:
    """API.md: a NaN (or inf) in k or v makes NaN only the rows that see its key, not the rows
    that mask it. Bad values at keys masked by kv_lens, causal, a window or mask_mod (and a whole
    key row of NaN): every output equals the textbook's, which reads only the keys a row sees,
    and the rows that mask every bad key are finite."""
    B, Hq, Hkv, S, T, D, Dv = 2, 2, 2, 4, 8, 4, 3
    q, k, v = _qkv(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=Dv, seed=5)
    opts: dict[str, object] = dict(lse=True, split=split)
    args: dict[str, object] = dict(q=q, k=k, v=v, scale=0.5)
    ref: dict[str, object] = dict(scale=0.5, return_lse=True)
    if case in ("kv_lens", "nan_row"):  # keys past kv_lens: masked for every row of that batch row
        opts["kv_lens"] = True
        args["kv_lens"] = ref["kv_lens"] = np.array([5, 3])
        cells = [(0, 0, 6, 1, "k"), (0, 1, 5, 0, "v"), (1, 0, 3, 2, "v"), (1, 1, 7, 3, "k")]
    elif case == "causal":  # i_abs = i + 4: key 7 only seen by the last row, key 6 by the last two
        opts["causal"] = ref["causal"] = True
        cells = [(0, 0, 7, 0, "v"), (0, 1, 6, 2, "k"), (1, 0, 6, 1, "v"), (1, 1, 7, 3, "k")]
    elif case == "window":  # rows see keys [i_abs - 1, i_abs]: keys 0, 1, 2 nobody, key 5 rows 1 and 2
        opts["window"] = (0, 0)
        args["window_left"], args["window_right"] = 1, 0
        ref["window"] = (1, 0)
        cells = [(0, 0, 0, 1, "v"), (0, 1, 2, 0, "k"), (1, 0, 5, 2, "v"), (1, 1, 1, 1, "k")]
    else:  # stripe_mask: heads other than 0 mask keys j % 3 == 1 (kv head h serves query head h)
        opts["mask_mod"] = stripe_mask_dsl
        ref["mask_mod"] = stripe_mask_np
        cells = [(0, 1, 1, 0, "v"), (0, 1, 4, 2, "k"), (1, 1, 7, 1, "v"), (1, 0, 2, 3, "k")]
    for b, h, j, d, name in cells:
        arr = k if name == "k" else v
        if case == "nan_row":
            k[b, h, j, :] = v[b, h, j, :] = np.nan
        else:
            arr[b, h, j, d % arr.shape[-1]] = bad
    if split:
        args["NSPLIT"] = 3
    with np.errstate(invalid="ignore"):  # (inf - inf in the rows that see a +inf score)
        o, lse = run_interp(opts, dict(BM=2, BN=2), args)
    o_ref, lse_ref = attention_ref(q, k, v, **ref)
    assert_close(o, o_ref, TOL, "o")
    assert_close(lse, lse_ref, TOL, "lse")
    # the rows that see no bad key: finite, and as with the bad keys' values replaced by zeros
    clean_k, clean_v = np.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0), np.nan_to_num(v, nan=0.0, posinf=0.0,
                                                                                        neginf=0.0)
    o_clean = attention_ref(q, clean_k, clean_v, **{**ref, "return_lse": False})
    same = np.all(o_ref == o_clean, axis=-1)
    assert same.sum() >= B * Hq * S // 2, f"too few rows that mask every bad key: {same.sum()}"
    assert np.all(np.isfinite(o[same])) and np.all(np.isfinite(lse[same]))
    np.testing.assert_allclose(o[same], o_clean[same], rtol=0, atol=1e-12)
    if case in ("kv_lens", "nan_row"):  # every bad key is past kv_lens: no row sees one
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(lse))
