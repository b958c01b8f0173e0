#!/usr/bin/env bash
# The main job: set up, then compile the shipped kernels and run them on the best adapter,
# each checked against the float64 reference. Exits non-zero if any case is off.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
python3 -m attnc devices
python3 -m attnc run "$@"
