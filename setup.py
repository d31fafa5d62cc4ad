"""Build script: the optional CUDA extension in csrc/.

The extension (`casakv_vllm._C`) is built only where torch was built with CUDA
and `nvcc` is on the PATH (or under CUDA_HOME).  Everywhere else the package
installs as pure Python and uses its Triton / torch paths.  Set
CASAKV_SKIP_CUDA_BUILD=1 to force the pure-Python install.

Targets: sm_90a (Hopper, wgmma/TMA capable) plus a portable PTX target so the
op also JIT-compiles on other GPUs.
"""

import glob
import os
import shutil

from setuptools import setup


def _cuda_build_possible() -> bool:
    if os.environ.get("CASAKV_SKIP_CUDA_BUILD") == "1":
        return False
    try:
        import torch
    except ImportError:
        return False
    if torch.version.cuda is None:
        return False
    # torch's own lookup: $CUDA_HOME / $CUDA_PATH, `which nvcc`, /usr/local/cuda
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and not shutil.which("nvcc"):
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    return bool(nvcc) and os.path.exists(nvcc)


def _extensions():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources or not _cuda_build_possible():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "-gencode=arch=compute_90a,code=sm_90a",
        # portable target: PTX for compute_80, JIT-compiled on any newer GPU
        "-gencode=arch=compute_80,code=compute_80",
    ]
    ext = CUDAExtension(
        name="casakv_vllm._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
