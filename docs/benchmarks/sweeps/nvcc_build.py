"""Builds one experiment .cu file with nvcc straight into a shared library
(no ninja needed) that torch loads as ops: the sweeps' CUDA experiments
(decode_timeline/, decode_cluster/) are not built by setup.py."""

import subprocess
import sysconfig

import torch


def build(src: str, so: str) -> str:
    from torch.utils import cpp_extension as ce
    inc = [f"-I{p}" for p in ce.include_paths(device_type="cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    lib = [f"-L{p}" for p in ce.library_paths(device_type="cuda")]
    cmd = [ce._join_cuda_home("bin", "nvcc"), "-O3", "-std=c++17", "--use_fast_math", "-shared",
           "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *inc,
           src, "-o", so, *lib, "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda"]
    subprocess.run(cmd, check=True)
    return so
