#!/usr/bin/env bash
# Run attnc's tests as CI does: set-up, the whole suite, then the subgroup-size reruns.
#
# lavapipe's subgroup size follows LP_NATIVE_VECTOR_WIDTH (128 -> 4, default 256 -> 8,
# 512 -> 16) and is fixed when the driver loads. The suite runs at 128 (4-lane subgroups, as
# SwiftShader's): lavapipe compiles a shader with barriers as a coroutine, and at 128 its LLVM
# takes well under half the time (tests/runtime/test_attention.py from an empty shader cache:
# 130 s against 338 s at 256), which is most of a cold run. Tests marked `subgroup_sizes`
# run again in fresh processes at 256 (lavapipe's default, the plans its users get) and 512.
# Exits non-zero at the first failing step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
python3 -m ruff check attnc tests examples scripts tools
export LP_NATIVE_VECTOR_WIDTH=128
# lavapipe's LLVM runs without its optimization passes (GALLIVM_PERF=nopt): the suite's shapes
# are small, so compiling is most of its time, and unoptimized code compiles in about 0.6 of it
# (tests/runtime/test_attention.py's prefill head dims from an empty shader cache: 29 s against
# 50 s). What the tests check is attnc's WGSL, whatever the driver's code generation does with
# it; `attnc bench` and the benchmarks measure the optimized code users get.
export GALLIVM_PERF=nopt
python3 -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadfile --durations=30 -m "not sanitize" tests
# the property tests of every strategy (forced plans, every option, split-KV combine, fuzzed
# kernels) run under the bounds sanitizer: each index into a buffer, workgroup array or vector
# checked, so a read whose value a select discards counts too (attnc's kernels run without Naga's
# index clamps on wgpu-native; lowering/sanitize.py). They compare against the reference as well,
# so they run once, sanitized; the shaders users get run unsanitized in every other test.
echo "test: sanitize with ATTNC_SANITIZE=bounds" >&2
ATTNC_SANITIZE=bounds python3 -m pytest -q -rs -p no:cacheprovider -n 2 --dist load --durations=15 -m sanitize tests
# at 256 the subgroup tests run with the heuristic plans lavapipe's users get (lanes, lane
# groups at 8 lanes); at 512 with the tiled strategy for every shape, whose row reductions
# cross subgroups at any size
echo "test: subgroup_sizes with LP_NATIVE_VECTOR_WIDTH=256" >&2
LP_NATIVE_VECTOR_WIDTH=256 python3 -m pytest -q -rs -p no:cacheprovider -n 2 -m subgroup_sizes tests
echo "test: subgroup_sizes with LP_NATIVE_VECTOR_WIDTH=512 and ATTNC_STRATEGY=tiled" >&2
ATTNC_STRATEGY=tiled LP_NATIVE_VECTOR_WIDTH=512 python3 -m pytest -q -rs -p no:cacheprovider -n 2 -m subgroup_sizes tests
