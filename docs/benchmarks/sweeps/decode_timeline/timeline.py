"""Per-CTA timeline of the CUDA split stage (split_timeline.cu) at 128k and 32k,
B=1, 10% of blocks: when CTAs start, when their first chunk lands, when the
loop and the CTA end; plus graph-timed split-stage times with attention and
with loads only.  Run on the GPU box from the repository root:
    python docs/benchmarks/sweeps/decode_timeline/timeline.py
(builds the experiment with nvcc into /tmp; no install.)"""

import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3] / "scripts"))
import kernel_sweep as ks  # noqa: E402  (the sweep's inputs and graph timer, from this checkout)

def build() -> str:
    """nvcc straight to a shared library (no ninja needed), loaded as torch ops."""
    import subprocess
    import sysconfig
    from torch.utils import cpp_extension as ce
    so = "/tmp/casakv_exp.so"
    inc = [f"-I{p}" for p in ce.include_paths(device_type="cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    lib = [f"-L{p}" for p in ce.library_paths(device_type="cuda")]
    cmd = [ce._join_cuda_home("bin", "nvcc"), "-O3", "-std=c++17", "--use_fast_math", "-shared",
           "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *inc,
           str(HERE / "split_timeline.cu"), "-o", so, *lib, "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu",
           "-ltorch_cuda"]
    subprocess.run(cmd, check=True)
    return so


torch.ops.load_library(build())
op = torch.ops.casakv_exp.sparse_decode_split
gen = torch.Generator(device="cuda").manual_seed(0)
QK = ks.D ** -0.5 * 1.4426950408889634


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


for n in (131072, 32768):
    kv, table, qq, sl, nb, ws = ks.decode_inputs(gen, n, 1)
    sels = [ks.physical_selection(s, table) for s, _ in ks.decode_selections(1, nb, 0.1, gen)]
    keep = sels[0].shape[-1]
    cnt = torch.full((1, ks.HKV), keep, dtype=torch.int32, device="cuda")
    out = torch.empty_like(qq)
    byts = ks.HKV * keep * ks.PAGE * 2 * ks.D * 2
    print(f"== N={n} B=1 10%: {keep} pages per KV head, {byts / 1e6:.1f} MB", flush=True)
    for splits, stages, warps in ((17, 2, 4), (33, 2, 4), (17, 3, 4), (66, 2, 4)):
        tl = torch.zeros(splits * ks.HKV, 5, dtype=torch.int64, device="cuda")
        times = {}
        for mode in (0, 1):
            def call(x, mode=mode):
                return lambda: op(qq, kv, table, sl, x, cnt, QK, splits, stages, warps, out, None,
                                  ws.acc, ws.m, ws.l, tl, mode)
            times[mode] = ks.bench_graph([call(x) for x in sels], reps=10)
        # timeline of single launches (not in a graph), over the rotated selections
        starts, first, loop, tail, total, spread_s, spread_e = [], [], [], [], [], [], []
        for x in sels:
            torch.cuda.synchronize()
            op(qq, kv, table, sl, x, cnt, QK, splits, stages, warps, out, None, ws.acc, ws.m, ws.l, tl, 0)
            torch.cuda.synchronize()
            t = tl.double().cpu()
            t0 = t[:, 0].min()
            starts += (t[:, 0] - t0).tolist()
            first += (t[:, 2] - t[:, 0]).tolist()
            loop += (t[:, 3] - t[:, 2]).tolist()
            tail += (t[:, 4] - t[:, 3]).tolist()
            total.append(float(t[:, 4].max() - t0))
            spread_e.append(float(t[:, 4].max() - t[:, 4].min()))
        us = 1e-3
        print(f"splits {splits} stages {stages} warps {warps}: graph-timed split stage {times[0] * 1e3:.1f} us "
              f"(loads only {times[1] * 1e3:.1f} us; hbm {byts / (times[0] / 1e3) / 3.0e12:.2f} / "
              f"{byts / (times[1] / 1e3) / 3.0e12:.2f} of 3.0 TB/s)", flush=True)
        print(f"   CTA start offset  median {statistics.median(starts) * us:.2f} p90 {q(starts, .9) * us:.2f} "
              f"max {max(starts) * us:.2f} us", flush=True)
        print(f"   start->1st chunk  median {statistics.median(first) * us:.2f} p90 {q(first, .9) * us:.2f} us; "
              f"chunk loop median {statistics.median(loop) * us:.2f} p90 {q(loop, .9) * us:.2f} max "
              f"{max(loop) * us:.2f} us; epilogue median {statistics.median(tail) * us:.2f} us", flush=True)
        print(f"   first CTA start -> last CTA end: median {statistics.median(total) * us:.2f} us; "
              f"CTA end spread median {statistics.median(spread_e) * us:.2f} us", flush=True)
    del kv, ws
    torch.cuda.empty_cache()
