"""KV tiles a mask removes entirely are skipped: the loop bounds come from the mask expression
(interval analysis of `kj <op> f(row)` conjuncts), not from a dense mask tensor."""

from __future__ import annotations

import re

from attnc.kernels.flash import flash_attention
from attnc.lowering import Plan, lower


def _bounds(**opts) -> tuple[list[str], list[str]]:
    wgsl = lower(flash_attention.trace(**opts), Plan())[0].wgsl
    return re.findall(r"k_lo = max\(k_lo, (.*)\);", wgsl), re.findall(r"k_hi = min\(k_hi, (.*)\);", wgsl)


def test_no_mask_visits_every_tile() -> None:
    assert _bounds() == ([], [])


def test_causal_ends_the_loop_at_the_last_row_of_the_tile() -> None:
    lo, hi = _bounds(causal=True)
    assert lo == [] and len(hi) == 1 and "r_hi" in hi[0] and "+ 1" in hi[0]


def test_window_and_kv_lens_bound_both_sides() -> None:
    lo, hi = _bounds(causal=True, window=(8, None), kv_lens=True)
    assert len(lo) == 1 and "r_lo" in lo[0] and "P.p_window_left" in lo[0]
    assert len(hi) == 2 and any("g_len" in h for h in hi)


def test_a_mask_the_analysis_cannot_bound_is_still_applied_per_key() -> None:
    """A mod of kv_idx (no interval) gives no loop bound; the per-key mask still holds."""
    lo, hi = _bounds(mask_mod=lambda b, h, q, kv: (kv % 2) == 0)
    assert lo == [] and hi == []
    wgsl = lower(flash_attention.trace(mask_mod=lambda b, h, q, kv: (kv % 2) == 0), Plan())[0].wgsl
    assert "floor_mod(kj, i32(2))" in wgsl
