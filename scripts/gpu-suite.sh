#!/usr/bin/env bash
# The GPU half of the test suite plus the kernel benchmark, in one call on a
# CUDA box (this project runs it through the device tool on an H100):
#   1. installs casakv-vllm from this checkout (builds csrc/ into casakv_vllm._C),
#   2. runs the kernel tests and GPU-marked tests on the GPU (PYTEST_K="a or b": a -k expression, kept whole),
#   3. runs the kernel benchmark (`python -m casakv_vllm.tools.bench.kernels`, the code
#      behind `casakv bench kernels`) and writes JSON + Markdown; with vLLM's
#      Triton kernel as a peer when .vllm_kernel/ was staged
#      (python scripts/stage_vllm_kernel.py, on the machine that has vLLM);
#   4. with vLLM's Python layer staged in .vllm_py/ (python scripts/stage_vllm_python.py)
#      the tests that drive casakv's builder and impl with hand-built vLLM metadata run too.
# Results go to $OUT (default ./gpu-out).  No vLLM is needed on that box.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, triton, setuptools; print('torch', torch.__version__, 'triton', triton.__version__, 'setuptools', setuptools.__version__)"; } | tee "$OUT/env.txt"

if [ -d "$REPO/.vllm_py" ]; then   # vLLM's pure-Python layer (no compiled ops): "unspecified" platform
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$REPO"/.vllm_py/wheels/*.whl \
        && tar -xJf "$REPO/.vllm_py/vllm-python.tar.xz" -C /tmp/site && export PYTHONPATH=/tmp/site \
        && echo "vLLM python layer: staged" || echo "vLLM python layer: FAILED to stage"
    # fail fast (before the build) when a module vLLM imports is missing from the staged wheels
    (cd /tmp && python3 -c "import vllm.config, vllm.sampling_params, vllm.v1.attention.backend, vllm.v1.kv_cache_interface, vllm.v1.sample.logits_processor, vllm.model_executor.models.llama; print('vLLM import: ok')" 2>&1 | tail -3) \
        | tee "$OUT/vllm-import.log"; grep -q "vLLM import: ok" "$OUT/vllm-import.log" || { echo "vLLM python layer: import FAILED"; exit 1; }
fi

t0=$(date +%s)
if python3 -m pip install -v --no-deps --no-build-isolation --no-cache-dir "$REPO" > "$OUT/install.log" 2>&1; then
    echo "install: ok ($(( $(date +%s) - t0 ))s)"
else
    echo "install: FAILED"; tail -30 "$OUT/install.log"; exit 1
fi
python3 -c "from torch.utils.cpp_extension import CUDA_HOME; print('CUDA_HOME', CUDA_HOME)"
(cd /tmp && python3 -c "import torch, casakv_vllm._C; print('CUDA op:', torch.ops.casakv.compact_kv)" 2>&1 | tail -1)

cd /tmp   # never import the checkout's folders by accident
[ "${SKIP_TESTS:-0}" = "1" ] || python3 -m pytest "$REPO/tests/kernels" "$REPO/tests/unit/test_ops.py" -q -p no:cacheprovider \
    -o addopts="--import-mode=importlib -ra" ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    # the module directly (= `casakv bench kernels`), so the benchmark does not
    # depend on the rest of the CLI importing
    # vLLM's own Triton kernel as a peer: staged from the CPU machine's vLLM by
    # scripts/stage_vllm_kernel.py into .vllm_kernel/ (carried with the call)
    VLLM_ARGS=""
    [ -d "$REPO/.vllm_kernel/vllm" ] && VLLM_ARGS="--vllm-kernel $REPO/.vllm_kernel"
    python3 -m casakv_vllm.tools.bench.kernels --json "$OUT/kernels-${GPU_NAME:-h200}.json" --md "$OUT/kernels-${GPU_NAME:-h200}.md" $VLLM_ARGS ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
    bench_rc=${PIPESTATUS[0]}
fi
[ "$tests_rc" = 0 ] && [ "${bench_rc:-0}" = 0 ]   # the suite's exit status: tests and benchmark
