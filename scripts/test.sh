#!/usr/bin/env bash
# Run attnc's tests as CI does: set-up, the whole suite, then the subgroup-size reruns.
#
# lavapipe's subgroup size follows LP_NATIVE_VECTOR_WIDTH (128 -> 4, default 256 -> 8,
# 512 -> 16) and is fixed when the driver loads, so tests marked `subgroup_sizes` run again
# in fresh processes under the other widths. Exits non-zero at the first failing step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
python3 -m ruff check attnc tests examples scripts tools
python3 -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadfile --durations=30 -m "not sanitize" tests
# the property tests of every strategy (forced plans, every option, split-KV combine, fuzzed
# kernels) run under the bounds sanitizer: each index into a buffer, workgroup array or vector
# checked, so a read whose value a select discards counts too (attnc's kernels run without Naga's
# index clamps on wgpu-native; lowering/sanitize.py). They compare against the reference as well,
# so they run once, sanitized; the shaders users get run unsanitized in every other test.
echo "test: sanitize with ATTNC_SANITIZE=bounds" >&2
ATTNC_SANITIZE=bounds python3 -m pytest -q -rs -p no:cacheprovider -n 2 --dist load --durations=15 -m sanitize tests
# only the tiled strategy reduces across subgroups, so the reruns use it for every shape
# (the stream and rows strategies, chosen for short rows, have no subgroup operations)
for width in 128 512; do
  echo "test: subgroup_sizes with LP_NATIVE_VECTOR_WIDTH=$width" >&2
  ATTNC_STRATEGY=tiled LP_NATIVE_VECTOR_WIDTH="$width" python3 -m pytest -q -p no:cacheprovider -n 2 \
    -m subgroup_sizes tests
done
