# Sourced by the GPU scripts: on an offline NVIDIA machine, install the Vulkan/GL loader
# debs from .gl/ and the wheels from .whl/ (both downloaded beforehand on a networked machine,
# see tools/README.md) into a private site directory, and point Vulkan at the NVIDIA driver.
# Idempotent.
site=${SWEEP_SITE:-/tmp/site}
if [ -z "${ATTNC_GPU_ENV_DONE:-}" ]; then
  # the Vulkan/GL loader, unless the system already has one
  if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
    if ls .gl/*.deb >/dev/null 2>&1; then
      for f in .gl/*.deb; do dpkg -x "$f" /; done
      ldconfig
    else
      echo "gpu_sweep: no libvulkan.so.1 and no .gl/*.deb (see tools/README.md)" >&2
    fi
  fi

  # the wheels, into a private site directory
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl || { echo "gpu_sweep: wheel install failed" >&2; exit 1; }
  else
    echo "gpu_sweep: no .whl/*.whl; using the installed packages" >&2
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$icd" ]; then export VK_DRIVER_FILES=$icd; fi

  export ATTNC_GPU_ENV_DONE=1
fi

# write_env_txt FILE: the date, the GPU and its driver, Python, the checkout's commit and a
# digest of the package's files (the commit line can be stale where the tree was copied onto
# the machine without its history; the same command on a checkout says which tree it was).
write_env_txt() {
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    python3 --version
    git log -1 --format='%H %s' 2>/dev/null || true
    echo "attnc files sha1: $(attnc_digest)"
  } > "$1" 2>&1
}

# attnc_digest: one sha1 over the package's files (names and contents), run from the repo root.
attnc_digest() {
  find attnc -type f \( -name '*.py' -o -name '*.lark' -o -name '*.wgsl' -o -name '*.json' \) | LC_ALL=C sort \
    | xargs sha1sum | sha1sum | cut -c1-12
}
