"""FlexAttention's own score and mask functions, written against attnc's public API.

The functions of PyTorch's test/inductor/test_flex_attention.py (the module-level ones and those
its tests define: causal, relative bias, ALiBi, captured buffers read by batch, head and
position, gathers through other captured tensors, document and prefix masks, trigonometry,
floor division, K/V shared by the batch, mask combiners), each ported by replacing `torch.x`
with `attnc.x` and torch tensors with numpy arrays, and each checked against a float64 numpy
twin through tests/textbook.py, on every CI adapter and variant family (1e-5 relative for f32,
2e-3 for f16).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

import attnc
from attnc.runtime import build
from tests.targets import spread, targets
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

TOL = {np.float32: 1e-5, np.float16: 2e-3}
B, HQ, HKV, S, T, D = 2, 4, 2, 24, 40, 32
inf = float("inf")


@dataclass
class Case:
    """One FlexAttention function: attnc's version and its numpy twin (broadcast index grids
    b [B,1,1,1], h [1,Hq,1,1], i [1,1,S,1], j [1,1,1,T]), and the shapes it runs on."""

    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    ref_score: Callable | None = None
    ref_mask: Callable | None = None
    shape: dict = field(default_factory=dict)


CASES: dict[str, Callable[[np.random.Generator], Case]] = {}


def case(fn: Callable[[np.random.Generator], Case]) -> Callable[[np.random.Generator], Case]:
    CASES[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------ module-level score mods
def _identity(score, b, h, m, n):
    return score


def _times_two(score, b, h, m, n):
    return score * 2


def _squared(score, b, h, m, n):
    return score * score


def _causal(score, batch, head, token_q, token_kv):
    return attnc.where(token_q >= token_kv, score, -inf)


def _rel_bias(score, batch, head, token_q, token_kv):
    return score + (token_q - token_kv)


def _rel_causal(score, batch, head, token_q, token_kv):
    return attnc.where(token_q >= token_kv, score + (token_q - token_kv), -inf)


def _generate_alibi_bias(num_heads: int):
    def _alibi_bias(score, batch, head, token_q, token_kv):
        scale = attnc.exp2(-((head + 1) * 8.0 / num_heads))
        return score + (token_kv - token_q) * scale
    return _alibi_bias


def _inverse_causal(score, b, h, m, n):
    return attnc.where(m <= n, score, -inf)


def _trig(score, b, h, m, n):
    return attnc.sin(attnc.cos(score)) + attnc.tan(b)


def _trig2(score, b, h, m, n):
    cos_score = attnc.cos(score)
    sin_score = attnc.sin(score)
    return cos_score * sin_score + attnc.tan(b)


def _causal_mask(batch, head, token_q, token_kv):
    return token_q >= token_kv


def _inverse_causal_mask(batch, head, token_q, token_kv):
    return token_q <= token_kv


def noop_mask(b, h, q, kv):
    return q >= 0


# numpy twins: the same formulas on broadcast index grids, in float64
def np_where(c, a, b):
    return np.where(c, a, b)


SCORE_MODS = {
    "_identity": (_identity, lambda s, b, h, m, n: s),
    "_times_two": (_times_two, lambda s, b, h, m, n: s * 2),
    "_squared": (_squared, lambda s, b, h, m, n: s * s),
    "_causal": (_causal, lambda s, b, h, m, n: np.where(m >= n, s, -inf)),
    "_inverse_causal": (_inverse_causal, lambda s, b, h, m, n: np.where(m <= n, s, -inf)),
    "_rel_bias": (_rel_bias, lambda s, b, h, m, n: s + (m - n)),
    "_rel_causal": (_rel_causal, lambda s, b, h, m, n: np.where(m >= n, s + (m - n), -inf)),
    "_generate_alibi_bias(Hq)": (_generate_alibi_bias(HQ),
                                lambda s, b, h, m, n: s + (n - m) * np.exp2(-((h + 1) * 8.0 / HQ))),
    "_trig": (_trig, lambda s, b, h, m, n: np.sin(np.cos(s)) + np.tan(b)),
    "_trig2": (_trig2, lambda s, b, h, m, n: np.cos(s) * np.sin(s) + np.tan(b)),
}
for _name, (_mod, _ref) in SCORE_MODS.items():
    CASES[_name] = (lambda mod, ref: lambda rng: Case(mod, None, ref))(_mod, _ref)


# ------------------------------------------------------------------ captured buffers
@case
def _head_offset(rng):
    head_offset = rng.random(HQ)

    def score_mod(score, b, h, m, n):
        return score * head_offset[h]
    return Case(score_mod, ref_score=lambda s, b, h, m, n: s * head_offset[h])


@case
def document_masking_causal(rng):
    document_id = np.arange(max(S, T)) // 7

    def score_mod(score, b, h, q_idx, kv_idx):
        causal_mask = q_idx >= kv_idx
        document_mask = document_id[q_idx] == document_id[kv_idx]
        return attnc.where(causal_mask & document_mask, score, -inf)
    return Case(score_mod,
                ref_score=lambda s, b, h, i, j: np.where((i >= j) & (document_id[i] == document_id[j]), s, -inf))


@case
def index_multiple(rng):
    bias = rng.standard_normal((B, S))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b][q_idx]
    return Case(score_mod, ref_score=lambda s, b, h, i, j: s + bias[b, i])


@case
def index_weird1(rng):
    bias = rng.standard_normal((4, B, HQ, S))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[0][b, h][q_idx]
    return Case(score_mod, ref_score=lambda s, b, h, i, j: s + bias[0, b, h, i])


@case
def index_weird2(rng):
    bias = rng.standard_normal((B, HQ, 4, S))
    which_bias = np.array(2)  # a 0-d array: a uniform

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b][h][which_bias, q_idx]
    return Case(score_mod, ref_score=lambda s, b, h, i, j: s + bias[b, h, 2, i])


@case
def skip_odd_keys(rng):
    def score_mod(score, b, h, q, kv):
        return attnc.where(kv % 2 == 0, score, -inf)
    return Case(score_mod, ref_score=lambda s, b, h, i, j: np.where(j % 2 == 0, s, -inf))


@case
def function_composition(rng):
    def score_mod_1(score, b, h, m, n):
        return score + (m - n)

    def score_mod_2(score, b, h, m, n):
        return attnc.where(m <= n, score, -inf)

    def composed_score_mod(score, b, h, m, n):
        return score_mod_2(score_mod_1(score, b, h, m, n), b, h, m, n)
    return Case(composed_score_mod, ref_score=lambda s, b, h, m, n: np.where(m <= n, s + (m - n), -inf))


@case
def captured_buffers_all_dims(rng):
    head_scale, batch_scale, tok_scale = rng.standard_normal(HQ), rng.standard_normal(B), rng.standard_normal(S)

    def all_bias(score, batch, head, token_q, token_kv):
        score = score + tok_scale[token_q]
        score = score + batch_scale[batch]
        score = score + head_scale[head]
        return score
    return Case(all_bias, ref_score=lambda s, b, h, i, j: s + tok_scale[i] + batch_scale[b] + head_scale[h])


@case
def seq_masking(rng):
    seq_idx = np.zeros(max(S, T), dtype=bool)
    seq_idx[S // 2:] = True

    def seq_mask_mod(score, b, h, q, kv):
        return attnc.where(seq_idx[q] == seq_idx[kv], score, -inf)
    return Case(seq_mask_mod, ref_score=lambda s, b, h, i, j: np.where(seq_idx[i] == seq_idx[j], s, -inf))


@case
def load_from_bias_seq_only(rng):
    bias = rng.standard_normal((S, T)).astype(np.float32)

    def bias_mod(score, b, h, q, kv):
        return score + bias[q, kv]
    return Case(bias_mod, ref_score=lambda s, b, h, i, j: s + bias[i, j])


@case
def load_from_bias_seq_batch(rng):
    bias = rng.standard_normal((B, S, T)).astype(np.float32)

    def bias_mod(score, b, h, q, kv):
        return score + bias[b, q, kv]
    return Case(bias_mod, ref_score=lambda s, b, h, i, j: s + bias[b, i, j])


@case
def load_from_bias_head_seq_batch(rng):
    bias = rng.standard_normal((B, HQ, S, T)).astype(np.float32)

    def bias_mod(score, b, h, q, kv):
        return score + bias[b, h, q, kv]
    return Case(bias_mod, ref_score=lambda s, b, h, i, j: s + bias[b, h, i, j])


@case
def load_rel_bias(rng):
    n = 32  # S == T here: q - kv + n stays in [1, 2n - 1], as in PyTorch's test
    rel_bias = rng.standard_normal(2 * n).astype(np.float32)

    def bias_mod(score, b, h, q, kv):
        return score + rel_bias[(q - kv) + n]
    return Case(bias_mod, ref_score=lambda s, b, h, i, j: s + rel_bias[(i - j) + n], shape=dict(S=n, T=n))


@case
def dependent_causal_bidirectional(rng):
    num_bidirectional = rng.integers(0, S, (B,), dtype=np.int32)

    def bias_mod(score, b, h, q, kv):
        causal_attention = q >= kv
        cur_num_bidirectional = num_bidirectional[b]
        bidirectional_attention_on_video = (q <= cur_num_bidirectional) & (kv <= cur_num_bidirectional)
        return attnc.where(bidirectional_attention_on_video | causal_attention, score, -inf)

    def ref(s, b, h, q, kv):
        n = num_bidirectional[b]
        return np.where(((q <= n) & (kv <= n)) | (q >= kv), s, -inf)
    return Case(bias_mod, ref_score=ref)


@case
def natten_2d(rng):
    W, WINDOW = 8, 1  # S = T = 32 positions on a 4 x 8 grid

    def get_x_y(idx):
        return idx / W, idx % W

    def natten_mask(score, b, h, q, kv):
        q_x, q_y = get_x_y(q)
        kv_x, kv_y = get_x_y(kv)
        return attnc.where(((q_x - kv_x).abs() <= WINDOW) | ((q_y - kv_y).abs() <= WINDOW), score, -inf)

    def ref(s, b, h, q, kv):
        return np.where((np.abs(q / W - kv / W) <= WINDOW) | (np.abs(q % W - kv % W) <= WINDOW), s, -inf)
    return Case(natten_mask, ref_score=ref, shape=dict(S=32, T=32))


@case
def floor_divide_decomposition(rng):
    def score_mod_func(score, b, h, q, kv):
        return score - q // (1 + kv)
    return Case(score_mod_func, ref_score=lambda s, b, h, q, kv: s - q // (1 + kv))


@case
def silu_on_score(rng):
    def silu_score(score, b, h, q, kv):
        return score * attnc.sigmoid(score)  # torch.nn.functional.silu
    return Case(silu_score, ref_score=lambda s, b, h, q, kv: s / (1 + np.exp(-s)))


@case
def padded_dense_causal(rng):
    seq_len = np.arange(B, dtype=np.int32) + 1

    def create_padded_dense_wrapper(orig_score_mod):
        def njt_score_mod(qk, b, h, q, kv):
            return attnc.where(qk <= seq_len[b], orig_score_mod(qk, b, h, q, kv), -inf)
        return njt_score_mod

    return Case(create_padded_dense_wrapper(_causal),
                ref_score=lambda s, b, h, q, kv: np.where((s <= seq_len[b]) & (q >= kv), s, -inf))


@case
def captured_scale(rng):
    scale = np.ones((), dtype=np.int32)

    def score_mod_scale(qk, b, h, q, kv):
        return qk + scale
    return Case(score_mod_scale, ref_score=lambda s, b, h, q, kv: s + 1)


@case
def njt_causal(rng):
    offsets = np.array([0, 10, 15, max(S, T)], dtype=np.int32)
    seq_idx = np.zeros(max(S, T), dtype=np.int32)
    for idx in range(len(offsets) - 1):
        seq_idx[offsets[idx]:offsets[idx + 1]] = idx

    def create_njt_wrapper(orig_score_mod, offsets, seq_idx):
        def njt_score_mod(qk, b, h, q, kv):
            q_nested = q - offsets[seq_idx[q]]
            kv_nested = kv - offsets[seq_idx[kv]]
            return orig_score_mod(qk, b, h, q_nested, kv_nested)
        return njt_score_mod

    def ref(s, b, h, q, kv):
        return np.where(q - offsets[seq_idx[q]] >= kv - offsets[seq_idx[kv]], s, -inf)
    return Case(create_njt_wrapper(_causal, offsets, seq_idx), ref_score=ref)


@case
def causal_block_non_divisible_with_captured_buffer(rng):
    offset_q = rng.standard_normal(S).astype(np.float16)  # bfloat16 in PyTorch's test
    offset_kv = rng.standard_normal(T).astype(np.float16)

    def score_mod(score, b, h, q, kv):
        return score + offset_q[q] + offset_kv[kv]
    return Case(score_mod, _causal_mask, ref_score=lambda s, b, h, q, kv: s + offset_q[q] + offset_kv[kv],
                ref_mask=lambda b, h, q, kv: q >= kv)


@case
def non_divisible_with_captured_buffer(rng):
    multiplier = rng.standard_normal(S).astype(np.float16)

    def apply_multiplicative_bias(score, b, h, q_idx, kv_idx):
        return score * multiplier[q_idx]
    return Case(apply_multiplicative_bias, ref_score=lambda s, b, h, q, kv: s * multiplier[q])


@case
def head_bias(rng):
    bias_flex = rng.standard_normal(HQ).astype(np.float16)

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + bias_flex[h]
    return Case(head_bias, ref_score=lambda s, b, h, q, kv: s + bias_flex[h])


@case
def rel_pos_1d(rng):
    bias_flex = rng.standard_normal(S + T).astype(np.float32)

    def rel_pos_1d(score, b, h, q_idx, kv_idx):
        return score + bias_flex[q_idx + kv_idx]
    return Case(rel_pos_1d, ref_score=lambda s, b, h, q, kv: s + bias_flex[q + kv])


@case
def rel_pos_2d_index_multiple(rng):
    bias_flex = rng.standard_normal((S, T)).astype(np.float32)

    def rel_pos_2d(score, b, h, q_idx, kv_idx):
        return score + bias_flex[q_idx][kv_idx]
    return Case(rel_pos_2d, ref_score=lambda s, b, h, q, kv: s + bias_flex[q, kv])


@case
def rel_pos_3d_transposed(rng):
    bias_flex = rng.standard_normal((HQ, T, S)).astype(np.float32)

    def rel_pos_3d_transposed(score, b, h, q_idx, kv_idx):
        return score + bias_flex[h, kv_idx, q_idx]
    return Case(rel_pos_3d_transposed, ref_score=lambda s, b, h, q, kv: s + bias_flex[h, kv, q])


@case
def new_empty_mask_mod(rng):
    attn_mask = np.tril(np.ones((B, 1, S, T), dtype=bool))

    def score_mod(score, b, h, q_idx, kv_idx):  # torch adds the bool to the score
        return score + attnc.where(attn_mask[b, 0, q_idx, kv_idx], 1.0, 0.0)

    def causal(b, h, q_idx, kv_idx):
        return attn_mask[b, 0, q_idx, kv_idx]
    return Case(score_mod, causal, ref_score=lambda s, b, h, q, kv: s + attn_mask[b, 0, q, kv],
                ref_mask=lambda b, h, q, kv: attn_mask[b, 0, q, kv])


@case
def euclidean_dist_pos_embed(rng):  # test_reduction_unrolled: the 3-wide reduction written out
    means = rng.standard_normal((max(S, T), 3)).astype(np.float32)
    length_scales = np.logspace(0.001, 0.1, HQ).astype(np.float32)

    def euclidean_dist_pos_embed(score, b, h, q_idx, k_idx):
        dist = attnc.sqrt(sum((means[q_idx, c] - means[k_idx, c]) ** 2 for c in range(3)))
        return attnc.exp(-dist / length_scales[h]) * score

    def ref(s, b, h, q, kv):
        dist = np.sqrt(sum((means[q, c].astype(np.float64) - means[kv, c]) ** 2 for c in range(3)))
        return np.exp(-dist / length_scales[h]) * s
    return Case(euclidean_dist_pos_embed, ref_score=ref)


# ------------------------------------------------------------------ mask mods
@case
def causal_mask(rng):
    return Case(None, _causal_mask, ref_mask=lambda b, h, q, kv: q >= kv)


@case
def inverse_causal_mask(rng):
    return Case(None, _inverse_causal_mask, ref_mask=lambda b, h, q, kv: q <= kv)


@case
def noop(rng):
    return Case(None, noop_mask, ref_mask=lambda b, h, q, kv: q >= 0)


@case
def sliding_window_and_causal(rng):
    window_size = 5  # a captured int: a uniform

    def causal_mask_slidewindow_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx <= kv_idx + window_size)
    return Case(None, causal_mask_slidewindow_mod, ref_mask=lambda b, h, q, kv: (q >= kv) & (q <= kv + 5))


@case
def mask_mod_combiners(rng):
    def causal_mask(b, h, q, kv):
        return q >= kv

    def neg_causal_mask(b, h, q, kv):
        return q < kv

    def sliding_window(b, h, q, kv):
        return (q - kv) <= 6
    mask = attnc.or_masks(attnc.and_masks(causal_mask, sliding_window), attnc.and_masks(causal_mask, neg_causal_mask))
    return Case(None, mask, ref_mask=lambda b, h, q, kv: (q >= kv) & (q - kv <= 6))


@case
def fully_masked_out_rows(rng):
    M = S // 2

    def mask_mod(b, h, q, kv):
        return q < M
    return Case(None, mask_mod,
                ref_mask=lambda b, h, q, kv: np.broadcast_to(q < M, np.broadcast_shapes(q.shape, kv.shape)))


@case
def block_mask_non_divisible(rng):
    seq = np.arange(max(S, T)) // 16

    def mod(b, h, q, kv):
        return seq[q] == seq[kv]
    return Case(None, mod, ref_mask=lambda b, h, q, kv: seq[q] == seq[kv])


@case
def document_masking_edge_case(rng):
    document_masks = np.zeros((B, max(S, T)), dtype=np.int32)
    document_masks[:, 10:] = 1

    def mask_mod(b, h, q, kv):
        same_doc = document_masks[b, q] == document_masks[b, kv]
        return same_doc
    return Case(None, mask_mod, ref_mask=lambda b, h, q, kv: document_masks[b, q] == document_masks[b, kv])


@case
def partial_input_lengths(rng):  # test_dynamic_shapes_bug_dynamic_batch: a functools.partial
    def _flex_attention_mask(b, h, q_idx, kv_idx, input_lengths):
        padding_condition = (q_idx < input_lengths[b]) & (kv_idx < input_lengths[b])
        return padding_condition
    lengths = np.array([S - 3, 9], dtype=np.int64)
    return Case(None, functools.partial(_flex_attention_mask, input_lengths=lengths),
                ref_mask=lambda b, h, q, kv: (q < lengths[b]) & (kv < lengths[b]))


@case
def lse_masked_sliding_and_global(rng):
    SLIDING_WINDOW = 4

    def sliding_window_causal(b, h, q_idx, kv_idx):
        causal_mask = q_idx >= kv_idx
        window_mask = q_idx - kv_idx <= SLIDING_WINDOW
        return causal_mask & window_mask

    def global_causal(b, h, q_idx, kv_idx):
        causal_mask = q_idx >= kv_idx
        window_mask = q_idx - kv_idx > SLIDING_WINDOW
        return causal_mask & window_mask
    both = attnc.or_masks(sliding_window_causal, global_causal)
    return Case(None, both, ref_mask=lambda b, h, q, kv: q >= kv)


# ------------------------------------------------------------------ the runs
CASE_NAMES = list(CASES)
# the cases run in f16 too (test_dtypes_fast in PyTorch's suite is float16)
F16_CASES = ["_times_two", "_rel_causal", "_trig", "_head_offset", "head_bias", "seq_masking",
             "load_from_bias_seq_batch", "causal_block_non_divisible_with_captured_buffer"]


def run_case(target, name: str, dtype, shape_overrides: dict | None = None) -> None:
    dev, family = target
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    c = CASES[name](rng)
    sh = dict(B=B, Hq=HQ, Hkv=HKV, S=S, T=T, D=D, Dv=D, Bkv=B) | c.shape | (shape_overrides or {})
    q = rng.standard_normal((sh["B"], sh["Hq"], sh["S"], sh["D"])).astype(dtype)
    k = rng.standard_normal((sh["Bkv"], sh["Hkv"], sh["T"], sh["D"])).astype(dtype)
    v = rng.standard_normal((sh["Bkv"], sh["Hkv"], sh["T"], sh["Dv"])).astype(dtype)
    o, lse = attnc.attention(q, k, v, score_mod=c.score_mod, mask_mod=c.mask_mod, return_lse=True,
                             device=dev, target=family)
    full = (sh["B"],) + k.shape[1:]
    o_ref, lse_ref = attention_ref(q, np.broadcast_to(k, full), np.broadcast_to(v, full[:3] + v.shape[3:]),
                                   score_mod=c.ref_score, mask_mod=c.ref_mask, return_lse=True)
    assert o.dtype == dtype
    assert_close(o, o_ref, TOL[dtype], f"{name}: o")
    assert_close(lse, lse_ref, TOL[dtype], f"{name}: lse")


# every function once in f32 and the f16 ones once more, each on one target in turn (the
# functions exercise the same lowering of captures and math on every target; per-target
# lowering of every op and capture kind is tested in test_flex_math.py and test_captures.py)
@pytest.mark.parametrize(("target", "name"), spread(CASE_NAMES), indirect=["target"])
def test_flex_function_f32(target, name: str) -> None:
    run_case(target, name, np.float32)


@pytest.mark.parametrize(("target", "name"), spread(F16_CASES, start=2), indirect=["target"])
def test_flex_function_f16(target, name: str) -> None:
    run_case(target, name, np.float16)


@pytest.mark.parametrize("target", targets(), indirect=True)
@pytest.mark.parametrize("name", ["_rel_causal"])
@pytest.mark.parametrize("Bq,Hkv", [(3, 2), (4, 1)])
def test_kv_batch_broadcast(target, name: str, Bq: int, Hkv: int) -> None:
    """K and V with batch 1 serve every query batch (test_kv_batch_broadcast); GQA 4:2 and 4:1."""
    run_case(target, name, np.float32, dict(B=Bq, Bkv=1, Hkv=Hkv))


@pytest.mark.parametrize("target", targets()[:1], indirect=True)
def test_recompile_changed_score_mod(target) -> None:
    """A closure flag read in Python control flow: a new value is a new kernel, a captured
    number (scale) a new uniform; both give the reference's results."""
    dev, family = target
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 16)).astype(np.float32) for _ in range(3))
    ADD = True
    scale = 2

    def score_mod_scale(qk, b, h, q, kv):
        if ADD:
            return qk + scale
        return qk * scale
    for add, sc in ((True, 2), (False, 2), (False, 3), (True, 5)):
        ADD, scale = add, sc
        traces = build._CACHE.traces
        o = attnc.attention(q, k, v, score_mod=score_mod_scale, device=dev, target=family)
        ref = attention_ref(q, k, v, score_mod=(lambda s, *_, c=sc: s + c) if add else (lambda s, *_, c=sc: s * c))
        assert_close(o, ref, 1e-5)
        if (add, sc) in ((False, 3), (True, 5)):  # a flag value seen before, a new number: no trace
            assert build._CACHE.traces == traces, (add, sc)


def test_every_case_is_ported() -> None:
    """The functions listed in PyTorch's test file, each a case here (a guard against dropping one)."""
    flex_names = {"_identity", "_times_two", "_squared", "_causal", "_inverse_causal", "_rel_bias",
                  "_rel_causal", "_generate_alibi_bias(Hq)", "_head_offset", "_trig", "_trig2"}
    assert flex_names <= set(CASES)
    assert len(CASES) >= 45
