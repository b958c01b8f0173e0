#!/usr/bin/env bash
# Session 10, second device call: the causal query-tile order and the tiled dec_gqa8 sweep.
# Usage (repo root, GPU machine): bash scripts/sweeps/s10_run1.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash scripts/sweeps/s10_run1.sh OUTDIR}
export SWEEP_WARM_MS=${SWEEP_WARM_MS:-300}
bash scripts/gpu_variant_sweep.sh scripts/sweeps/s10_causal.txt "$out/causal"
bash scripts/gpu_variant_sweep.sh scripts/sweeps/s10_decode.txt "$out/decode"
