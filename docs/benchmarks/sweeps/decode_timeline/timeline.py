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

sys.path.insert(0, str(HERE.parent))
from nvcc_build import build as nvcc  # noqa: E402


def build(src: str = "split_timeline.cu", so: str = "/tmp/casakv_exp.so") -> str:
    return nvcc(str(HERE / src), so)


torch.ops.load_library(build())
torch.ops.load_library(build("split_timeline_v1.cu", "/tmp/casakv_exp1.so"))  # the first timeline's kernel
op = torch.ops.casakv_exp.sparse_decode_split
op_v1 = torch.ops.casakv_exp1.sparse_decode_split
gen = torch.Generator(device="cuda").manual_seed(0)
QK = ks.D ** -0.5 * 1.4426950408889634


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


import triton  # noqa: E402

from casakv_vllm.triton_kernels.sparse_decode import _sparse_decode_merge_kernel  # noqa: E402


def merge(out, ws, splits):
    """The tree's Triton merge kernel, as a programmatic dependent launch."""
    _sparse_decode_merge_kernel[(1, ks.HQ)](
        out, out, ws.acc, ws.m, ws.l, splits, out.stride(0), out.stride(1), out.stride(2), 0, 0,
        ws.acc.stride(0), ws.acc.stride(1), ws.acc.stride(2), ws.m.stride(0), ws.m.stride(1),
        HEAD_SIZE=ks.D, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=ks.D, WRITE_LSE=False, PDL=True,
        num_warps=4, launch_pdl=True)


def timeline(tl, run, sels):
    """Per-CTA phases (us, medians over the selections) of single launches."""
    first, loop, tail, total, spread = [], [], [], [], []
    for x in sels:
        torch.cuda.synchronize()
        run(x)
        torch.cuda.synchronize()
        t = tl.double().cpu()
        ok = t[:, 2] > 0  # warp 0 had a chunk
        first += (t[ok, 2] - t[ok, 0]).tolist()
        loop += (t[ok, 3] - t[ok, 2]).tolist()
        tail += (t[:, 4] - t[:, 3]).tolist()
        total.append(float(t[:, 4].max() - t[:, 0].min()))
        spread.append(float(t[:, 4].max() - t[:, 4].min()))
    us = 1e-3
    return (f"to 1st chunk {statistics.median(first) * us:.2f} (p90 {q(first, .9) * us:.2f}), loop "
            f"{statistics.median(loop) * us:.2f} (p90 {q(loop, .9) * us:.2f}), CTA end {statistics.median(tail) * us:.2f},"
            f" first start->last end {statistics.median(total) * us:.2f}, end spread {statistics.median(spread) * us:.2f}")


for n in (131072, 32768):
    kv, table, qq, sl, nb, ws = ks.decode_inputs(gen, n, 1)
    logical = ks.decode_selections(1, nb, 0.1, gen)
    sels = [ks.physical_selection(s, table) for s, _ in logical]
    keep = sels[0].shape[-1]
    cnt = torch.full((1, ks.HKV), keep, dtype=torch.int32, device="cuda")
    ctr = torch.zeros(1, 3 * ks.HKV, dtype=torch.int32, device="cuda")
    out = torch.empty_like(qq)
    byts = ks.HKV * keep * ks.PAGE * 2 * ks.D * 2
    ref = ks.sparse_paged_decode_ref(qq, kv, table, sl, logical[0][0], cnt, ks.D ** -0.5)
    print(f"== N={n} B=1 10%: {keep} pages per KV head, {byts / 1e6:.1f} MB", flush=True)
    tri = ks.bench_graph([lambda x=x: ks.sparse_paged_decode(qq, kv, table, sl, x, cnt, ks.D ** -0.5, out, workspace=ws,
                                                             sel_physical=True) for x in sels], reps=10)
    print(f"tree's Triton decode (split + merge): {tri * 1e3:.1f} us (hbm {byts / (tri / 1e3) / 3.0e12:.2f})",
          flush=True)
    for splits, stages in ((17, 2), (33, 2), (17, 3), (33, 3), (66, 2)):
        tl = torch.zeros(splits * ks.HKV, 5, dtype=torch.int64, device="cuda")
        runs = [("first timeline's kernel: split", 0, False, True), ("split", 0, False, False)]
        runs += [(f"dynamic chunks, {k} per grab: split", 8 | (k << 4), False, False) for k in (1, 2, 4)]
        runs += [(f"dynamic chunks, {k} per grab: split + merge", 8 | (k << 4), True, False) for k in (1, 2, 4)]
        for name, mode, with_merge, v1 in runs:
            def run(x, mode=mode, with_merge=with_merge, v1=v1):
                if v1:
                    op_v1(qq, kv, table, sl, x, cnt, QK, splits, stages, 4, out, None, ws.acc, ws.m, ws.l, tl, mode)
                else:
                    op(qq, kv, table, sl, x, cnt, QK, splits, stages, 4, out, None, ws.acc, ws.m, ws.l, tl, mode, ctr)
                if with_merge:
                    merge(out, ws, splits)
            ms = ks.bench_graph([lambda x=x: run(x) for x in sels], reps=10)
            assert int(ctr.abs().sum()) == 0, "counters not reset"
            line = f"splits {splits} stages {stages} {name}: {ms * 1e3:.1f} us (hbm {byts / (ms / 1e3) / 3.0e12:.2f})"
            if with_merge:
                out.fill_(float("nan"))
                run(sels[0])
                line += f" err {ks.rel(out, ref):.1e}"
            elif stages == 2 and splits in (17, 33) and "4 per" not in name:
                line += "\n     " + timeline(tl, run, sels)
            print(line, flush=True)
    del kv, ws
    torch.cuda.empty_cache()
