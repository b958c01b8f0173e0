#!/usr/bin/env bash
# The whole GPU sweep in one go, for the offline NVIDIA H100/H200 machine (Python 3.12, no
# network, no Vulkan loader): installs the loader debs from .gl/ and the wheels from .whl/
# (both prepared beforehand, see below), then for each backend (wgpu-native, Dawn) runs
#   attnc bench --suite seeds --compare ort,naive[,tinygrad]
# which measures that backend's ceilings (FMA f32/f16, copy) first, and writes
#   OUTDIR/<backend>.json  OUTDIR/<backend>.png  OUTDIR/<backend>.log
# plus OUTDIR/env.txt (driver, GPU, packages). A backend that fails does not stop the other.
#
# Usage (repo root):  bash tools/gpu/gpu_sweep.sh OUTDIR [extra attnc bench args...]
#
# Before, on a networked machine, inside this checkout: download the loader debs into .gl/ and
# the Python 3.12 wheels (wgpu, wgpudawn and their dependencies; onnxruntime-webgpu, tinygrad,
# dawn-python and matplotlib for the baselines and the plot) into .whl/, as tools/README.md
# says, and carry both to the GPU machine with the working tree. Without the
# onnxruntime/tinygrad/matplotlib wheels those baselines or the plot are reported missing.
#
# Environment knobs: SWEEP_TIMEOUT (seconds per backend, default 270), SWEEP_BACKENDS
# (default "wgpu dawn"), SWEEP_SUITE (default seeds), SWEEP_SITE (default /tmp/site).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out=${1:?usage: bash tools/gpu/gpu_sweep.sh OUTDIR [extra attnc bench args...]}
shift
mkdir -p "$out"
site=${SWEEP_SITE:-/tmp/site}

source tools/gpu/gpu_env.sh

compare=ort,naive
if python3 -c 'import tinygrad, pydawn' 2>/dev/null; then compare=$compare,tinygrad; fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  python3 --version
  python3 -m pip list --path "$site" 2>/dev/null || true
  echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
  echo "compare=$compare"
} > "$out/env.txt" 2>&1

status=0
for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
  echo "gpu_sweep: $backend" >&2
  timeout "${SWEEP_TIMEOUT:-270}" python3 -m attnc.bench --suite "${SWEEP_SUITE:-seeds}" \
    --device "$backend:vulkan" --compare "$compare" \
    --json "$out/$backend.json" --plot "$out/$backend.png" "$@" 2>&1 | tee "$out/$backend.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "gpu_sweep: $backend exited with $rc" | tee -a "$out/$backend.log" >&2
    status=1
  fi
done
exit $status
