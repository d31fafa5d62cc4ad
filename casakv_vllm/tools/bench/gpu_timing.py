"""What the GPU benchmarks share: the attention shape, the timers, the bandwidth ceilings and the random
paged cache.

Shape: Llama-3-8B attention (32 q / 8 KV heads, head_dim 128, bf16), paged KV
with block size 16 and a random block table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
ROTATE = 8  # decode: selections timed in rotation (see bench_graph)


def _bench(fn, rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def bench_graph(fns, reps: int = 20, rounds: int = 4) -> float:
    """Median ms per call of ``fns`` (calls over different data, in rotation)
    captured back to back in one CUDA graph, ``rounds`` times over.

    Decode steps are tiny (tens of us) and are replayed from CUDA graphs in
    vLLM; timing graph replays leaves out the host's launch overhead, which
    otherwise shows up as idle GPU time between events.  The rotation keeps
    the next call's data out of L2 when one call's data would fit there.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:  # compile / autotune outside the capture
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (rounds * len(fns)))
    del graph
    return float(sorted(times)[len(times) // 2])


def paged_kv(batch: int, n: int, gen: torch.Generator):
    """Random paged cache [blocks, HKV, PAGE, 2D] (HND) and a random block table."""
    per_seq = n // PAGE
    nblk = batch * per_seq + 1
    kv = torch.randn(nblk, HKV, PAGE, 2 * D, dtype=DTYPE, device="cuda", generator=gen)
    perm = torch.randperm(nblk - 1, device="cuda", generator=gen)[: batch * per_seq] + 1
    return kv, perm.view(batch, per_seq).to(torch.int32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def copy_same_bytes(nbytes: int, rotate: int = ROTATE) -> float:
    """ms of a device copy moving ``nbytes`` through HBM (half read, half
    written), graph-replayed over ``rotate`` buffer pairs (one pair above
    256 MB, which L2 cannot hold anyway), as the decode calls are timed."""
    half = max(1, nbytes // 4)  # bf16 elements per side
    pairs = [(torch.randn(half, dtype=DTYPE, device="cuda"), torch.empty(half, dtype=DTYPE, device="cuda"))
             for _ in range(rotate if nbytes < 256 * 1024**2 else 1)]
    ms = bench_graph([lambda a=a, b=b: b.copy_(a) for a, b in pairs])
    del pairs
    torch.cuda.empty_cache()
    return ms


@triton.jit
def _read_kernel(x_ptr, o_ptr, n, per, BLOCK: tl.constexpr):
    """Sums its slice ``[pid * per, (pid + 1) * per)`` of ``x`` (so nothing
    is optimised away) and writes one float."""
    start = tl.program_id(0).to(tl.int64) * per  # int64: multi-GB cells pass 2**31 elements
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, tl.minimum(start + per, n), BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(o_ptr + tl.program_id(0), tl.sum(acc, 0))


def read_same_bytes(nbytes: int, rotate: int = ROTATE, programs=(264, 528, 1056)) -> float:
    """Best ms of one read-only launch over ``nbytes`` contiguous bytes,
    graph-replayed over ``rotate`` buffers (one above 256 MB) like the
    decode calls: how fast any single launch can read that much."""
    n = max(1, nbytes // 2)  # bf16 elements
    bufs = [torch.randn(n, dtype=DTYPE, device="cuda") for _ in range(rotate if nbytes < 256 * 1024**2 else 1)]
    best = None
    for progs in programs:
        per = triton.cdiv(triton.cdiv(n, progs), 4096) * 4096
        o = torch.empty(progs, device="cuda")
        ms = bench_graph([lambda x=x: _read_kernel[(progs,)](x, o, n, per, BLOCK=4096, num_warps=8) for x in bufs])
        best = ms if best is None else min(best, ms)
    del bufs
    torch.cuda.empty_cache()
    return best


def _copy_bandwidth() -> float:
    a = torch.randn(512 * 1024**2, dtype=DTYPE, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a))
    del a, b
    return 2 * 512 * 1024**2 * 2 / (ms / 1e3)
