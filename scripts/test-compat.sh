#!/usr/bin/env bash
# Run the unit tests against vLLM 0.33's Python sources (`make test-compat`).
#
#   scripts/test-compat.sh [VENV_DIR]      (VLLM_COMPAT_VERSION=0.33.0 by default)
#
# No CPU build of vLLM 0.33 exists yet, so it cannot serve here: this unpacks
# the Python files of PyPI's vLLM 0.33 wheel (cached under $CASAKV_CACHE or
# ~/.cache/casakv, outside the repository) into a scratch directory, puts it
# first on PYTHONPATH and runs tests/unit against it.  The venv's own vLLM
# (0.32, CPU build) is not touched.  Compiled vLLM ops are left out (the
# wheel's are CUDA builds for another torch), so the tests that need vLLM's
# compiled CPU attention kernels are deselected, named below.
set -euo pipefail

VENV="${1:-.venv}"
VERSION="${VLLM_COMPAT_VERSION:-0.33.0}"
CACHE="${CASAKV_CACHE:-$HOME/.cache/casakv}"
WHEELS="$CACHE/wheels"
SCRATCH="$CACHE/compat/vllm-$VERSION"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$VENV/bin/python"

mkdir -p "$WHEELS"
wheel="$(ls "$WHEELS"/vllm-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    echo "[compat] downloading the vllm==$VERSION wheel (no dependencies) into $WHEELS"
    if ! "$VENV/bin/pip" download -q --no-deps "vllm==$VERSION" -d "$WHEELS" 2> >(grep -v "is ignored: it is neither" >&2); then
        echo "make test-compat: the vllm==$VERSION wheel is not available from the package registry (pip download failed); nothing was tested" >&2
        exit 1
    fi
    wheel="$(ls "$WHEELS"/vllm-"$VERSION"-*.whl | head -n 1)"
fi

if [ ! -f "$SCRATCH/.complete" ]; then
    echo "[compat] unpacking the Python sources of $(basename "$wheel") into $SCRATCH"
    rm -rf "$SCRATCH"
    "$PY" - "$wheel" "$SCRATCH" <<'PY'
import sys
import zipfile

wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("vllm/") and not m.endswith(".so")]
    z.extractall(dest, members)
print(f"[compat] {len(members)} files")
PY
    touch "$SCRATCH/.complete"
fi

# the tests must see 0.33's sources, not the venv's 0.32
PYTHONPATH="$SCRATCH" "$PY" - "$VERSION" "$SCRATCH" <<'PY'
import sys

import vllm
from vllm.version import __version__

version, scratch = sys.argv[1:]
assert __version__ == version and vllm.__file__.startswith(scratch), (__version__, vllm.__file__)
import casakv_vllm.integration.plugin as plugin

plugin.register()
print(f"[compat] vllm {__version__} from {scratch}: casakv's plugin imports and registers")
PY

cd "$ROOT"
PYTHONPATH="$SCRATCH" exec "$VENV/bin/pytest" tests/unit -m "not slow" -p no:cacheprovider \
    --deselect "tests/unit/test_cpu_layer.py::test_torch_writer_matches_vllm_kernel_layout" \
    ${PYTEST_ARGS:-}
