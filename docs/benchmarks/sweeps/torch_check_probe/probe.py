"""Builds probe.cu with nvcc (as setup.py's flags) and calls each op in a
subprocess, on CPU, meta and CUDA tensors; prints the exit code and the last
line of stderr.  python docs/benchmarks/sweeps/torch_check_probe/probe.py"""

import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from torch.utils import cpp_extension as ce

HERE = Path(__file__).resolve().parent
so = "/tmp/casakv_probe.so"
inc = [f"-I{p}" for p in ce.include_paths(device_type="cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
lib = [f"-L{p}" for p in ce.library_paths(device_type="cuda")]
for flags in (["-gencode=arch=compute_90a,code=sm_90a"], []):
    subprocess.run([ce._join_cuda_home("bin", "nvcc"), "-O3", "-std=c++17", "--use_fast_math", "-shared", "-Xcompiler",
                    "-fPIC", *flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *inc,
                    str(HERE / "probe.cu"), "-o", so, *lib, "-lc10", "-ltorch", "-ltorch_cpu"], check=True)
    print("nvcc flags:", flags or "(none)", flush=True)
    for op in ("literal", "streamed", "streamed_int"):
        for dev in ("cpu", "meta", "cuda"):
            code = (f"import torch; torch.ops.load_library({so!r}); "
                    f"torch.ops.casakv_probe.{op}(torch.empty(96, device={dev!r}))")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            last = (r.stderr.strip().splitlines() or [""])[-1][:120]
            print(f"  {op:13s} {dev:5s}: rc {r.returncode}  {last}", flush=True)
