"""`casakv bench kernels`: casakv's paged kernels vs SDPA and FlexAttention, one run.

Shape: Llama-3-8B attention (32 q / 8 KV heads, head_dim 128, bf16), paged KV
with block size 16 and a random block table.  Every comparison is taken side
by side in the same process on the same GPU; the copy bandwidth used for
``hbm_fraction`` is measured in the same run.

Prefill (one sequence of N tokens, causal) on three masks:
  causal          full causal attention (density 1.0)
  a-shape         128 sink tokens + 4096-token local window
  vertical-slash  128 sinks + 1024 window + every 16th 128-token column block
SDPA (flash) always runs the full causal mask on contiguous KV (it cannot skip
blocks); FlexAttention runs the identical mask with a 128x128 block mask.

Decode (one token per sequence, batch B, context N): all blocks selected, and
10% of the blocks selected (first and last block always included).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from casakv_vllm.tools.bench.gpu_timing import (D, DTYPE, HKV, HQ, PAGE, ROTATE, _bench,  # noqa: F401
                                                _copy_bandwidth, bench_graph, copy_same_bytes, paged_kv,
                                                read_same_bytes, rel_err)

SINK, WINDOW, VS_WINDOW, VS_EVERY, VS_BLOCK = 128, 4096, 1024, 16, 128
PAIR_ROUNDS = 3  # prefill: casakv and Flex timed alternately this many times (see bench_pair)


@dataclass
class Result:
    kind: str
    seq_len: int
    batch: int
    mask: str
    density: float
    casakv_ms: float
    sdpa_ms: float
    flex_ms: float | None
    bytes_read: int
    hbm_fraction: float | None
    rel_err: float
    index_ms: float | None = None  # building the tile index (per batch and layer); not in casakv_ms
    # vLLM's unified_attention on the same paged cache (causal prefill, dense decode)
    vllm_triton_ms: float | None = None
    vllm_triton_rel_err: float | None = None  # its output vs casakv's
    # decode: a device copy moving bytes_read through HBM, timed like the decode
    # call (graph replay, rotating buffers); copy_same_fraction is its hbm_fraction,
    # the most a kernel touching that many bytes in one launch reaches
    copy_same_ms: float | None = None
    copy_same_fraction: float | None = None
    # decode: a one-launch read-only kernel over bytes_read contiguous bytes, timed
    # the same way (read_same_bytes): the ceiling of one launch reading that much
    read_same_ms: float | None = None
    read_same_fraction: float | None = None
    # prefill: every round of the alternating casakv / Flex timings (medians above)
    casakv_rounds_ms: list[float] | None = None
    flex_rounds_ms: list[float] | None = None
    # torch SDPA restricted to EFFICIENT_ATTENTION (the CUTLASS kernel xformers'
    # memory_efficient_attention forward calls); dense cells only, else None
    mem_efficient_ms: float | None = None
    mem_efficient_gqa: str | None = None  # how K/V heads were matched to the 32 query heads
    mem_efficient_rel_err: float | None = None  # its output vs casakv's


def bench_pair(ours, peer, rep_ms: int, rounds: int = PAIR_ROUNDS) -> tuple[list[float], list[float] | None]:
    """Time ``ours`` and ``peer`` alternately, ``rounds`` times each
    (``do_bench`` medians), so drift in clocks or temperature during the run
    hits both alike; a 330 ms kernel gets a single repeat per ``do_bench``
    call, so one call alone is a single sample.  ``peer`` may be None, or
    fail (then its list is None)."""
    a: list[float] = []
    b: list[float] | None = [] if peer is not None else None
    for _ in range(rounds):
        a.append(_bench(ours, rep_ms))
        if b is not None:
            t = _try_bench(peer, rep_ms)
            b = None if t is None else b + [t]
    return a, b


def _median(xs: list[float]) -> float:
    return float(sorted(xs)[len(xs) // 2])


def _try_bench(fn, rep_ms: int) -> float | None:
    """Time a peer (FlexAttention); None when it fails to compile or run at this shape."""
    try:
        return _bench(fn, rep_ms)
    except Exception as err:  # noqa: BLE001  (inductor/triton errors of the peer, reported as missing)
        print(f"  peer failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return None


def contiguous_kv(kv, table):
    """K, V as [B, HKV, N, D] from the paged cache (for SDPA / Flex)."""
    g = kv[table.long()]  # [B, nb, HKV, PAGE, 2D]
    b, nb = table.shape
    g = g.permute(0, 2, 1, 3, 4).reshape(b, HKV, nb * PAGE, 2 * D)
    return g[..., :D].contiguous(), g[..., D:].contiguous()


def _causal(b, h, q, k):
    return q >= k


def _a_shape(b, h, q, k):
    return (q >= k) & ((k < SINK) | (q - k < WINDOW))


def _vertical_slash(b, h, q, k):
    return (q >= k) & ((k < SINK) | (q - k < VS_WINDOW) | ((k // VS_BLOCK) % VS_EVERY == 3))


MASK_MODS = {"causal": _causal, "a-shape": _a_shape, "vertical-slash": _vertical_slash}


def bench_patterns(name: str, n: int):
    """The benchmark's masks as patterns of one sequence of ``n`` tokens (also used by scripts/kernel_sweep.py)."""
    from casakv_kernels.patterns import PatternBatch

    if name == "causal":
        return PatternBatch.dense(1, HKV, device="cuda")
    if name == "a-shape":
        return PatternBatch.local(1, HKV, SINK, WINDOW, device="cuda")
    # vertical stripes as a column list (the kernels turn it into bitmaps)
    cols = torch.arange(n, device="cuda")
    cols = cols[(cols // VS_BLOCK) % VS_EVERY == 3].to(torch.int32)
    p = PatternBatch.empty(1, HKV, num_vertical=cols.numel(), device="cuda")
    p.sink.fill_(SINK)
    p.window.fill_(VS_WINDOW)
    p.vertical.copy_(cols.view(1, 1, -1).expand_as(p.vertical))
    p.sparse_only = True  # no full head, as a policy building this pattern would declare
    return p


def _mem_efficient(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """A callable running torch SDPA with only the EFFICIENT_ATTENTION backend,
    and how GQA was handled.

    That backend needs as many K/V heads as query heads.  Like xformers does for
    its 5-D (BMGHK) GQA inputs, the KV head goes into the batch dimension and
    each K/V head is repeated over its query group as a stride-0 view (no copy):
    q [B, HQ, M, D] -> [B*HKV, G, M, D], k/v -> [B*HKV, G (stride 0), N, D].
    If the backend refuses that view, K/V are copied with ``repeat_interleave``
    (as the SDPA-flash column does).  Returns (fn, gqa) where fn() gives
    [B, HQ, M, D].
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, hq, m, d = qb.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv

    def make(qq, kk, vv):
        def fn():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale)
            return o.reshape(b, hq, m, d)
        return fn

    qv = qb.reshape(b * hkv, g, m, d)
    kv_view = [t.reshape(b * hkv, 1, n, d).expand(b * hkv, g, n, d) for t in (k, v)]
    fn = make(qv, *kv_view)
    try:
        fn()
        torch.cuda.synchronize()
        return fn, "stride-0 head view (no copy)"
    except RuntimeError as err:
        print(f"  mem-efficient refused the stride-0 view ({str(err).splitlines()[0][:120]}); copying K/V")
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return make(qb, kk, vv), "repeat_interleave copy"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _add_vllm(res: Result, vllm_attn, q, kv, table, qsl, seq_lens, max_q: int, scale: float, ours, timer) -> None:
    """Fill ``res.vllm_triton_*`` with vLLM's unified_attention on the same paged cache."""
    from casakv_vllm.tools.bench.vllm_triton import make_call

    if vllm_attn is None:
        return
    out = torch.empty_like(q)
    try:
        fn = make_call(vllm_attn, q, kv, table, qsl, seq_lens, max_q, res.seq_len, scale, out)
        fn()
        res.vllm_triton_rel_err = rel_err(out, ours)
        res.vllm_triton_ms = timer(fn)
    except Exception as err:  # noqa: BLE001  (the peer failing at this shape leaves its cell empty)
        print(f"  vLLM kernel failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    del out
    torch.cuda.empty_cache()


def bench_prefill(n: int, masks, flex, gen, rep_ms: int, vllm_attn=None) -> list[Result]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    from casakv_kernels.sparse_index import build_prefill_index
    from casakv_kernels.sparse_prefill import plan_blocks, sparse_paged_attention

    kv, table = paged_kv(1, n, gen)
    q = torch.randn(n, HQ, D, dtype=DTYPE, device="cuda", generator=gen)
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    k, v = contiguous_kv(kv, table)
    qb = q.transpose(0, 1).unsqueeze(0)  # [1, HQ, N, D]
    scale = D ** -0.5
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        sdpa_ms = _bench(lambda: F.scaled_dot_product_attention(qb, kk, vv, is_causal=True), rep_ms)
        del kk, vv
    torch.cuda.empty_cache()
    results = []
    for name in masks:
        pat = bench_patterns(name, n)
        # the tiles the op would plan for this batch (sparse-only patterns may get WIDE_TILES)
        block_q, block_n = plan_blocks(HQ // HKV, D, n, n, DTYPE, pat.sparse_only)
        causal_tiles = sum(min(triton_cdiv((i + 1) * block_q, block_n), triton_cdiv(n, block_n))
                           for i in range(triton_cdiv(n, block_q)))
        index = build_prefill_index(pat, qsl, seq_lens, n, n, block_q, block_n)
        density = float(index.tile_count.sum()) / (HKV * causal_tiles)
        out = torch.empty_like(q)

        def run():
            sparse_paged_attention(q, kv, table, qsl, seq_lens, scale, out, pat, index, n, n)

        index_ms = _bench(lambda: build_prefill_index(pat, qsl, seq_lens, n, n, block_q, block_n), rep_ms)
        bm = create_block_mask(MASK_MODS[name], None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
        ours_runs, flex_runs = bench_pair(run, lambda: flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale),
                                          rep_ms)
        casakv_ms = _median(ours_runs)
        flex_ms = _median(flex_runs) if flex_runs else None
        run()
        ours = out.transpose(0, 1).unsqueeze(0)
        if flex_ms is not None:
            err = rel_err(ours, flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale))
        else:  # no peer output to compare with at this shape
            err = float("nan")
        res = Result("prefill", n, 1, name, round(density, 4), casakv_ms, sdpa_ms, flex_ms,
                     int(index.tile_count.sum()) * block_n * 2 * D * 2, None, err, index_ms,
                     casakv_rounds_ms=ours_runs, flex_rounds_ms=flex_runs)
        if name == "causal":
            _add_mem_efficient(res, qb, k, v, True, scale, ours, lambda f: _bench(f, rep_ms))
            _add_vllm(res, vllm_attn, q, kv, table, qsl, seq_lens, n, scale, out, lambda f: _bench(f, rep_ms))
        results.append(res)
        del bm, index
        torch.cuda.empty_cache()
    return results


def _add_mem_efficient(res: Result, qb, k, v, causal: bool, scale: float, ours, timer) -> None:
    """Fill ``res.mem_efficient_*`` (left None when the backend fails here)."""
    try:
        fn, res.mem_efficient_gqa = _mem_efficient(qb, k, v, causal, scale)
        res.mem_efficient_rel_err = rel_err(ours, fn())
        res.mem_efficient_ms = timer(fn)
    except Exception as err:  # noqa: BLE001  (backend unavailable / out of memory at this shape)
        print(f"  mem-efficient failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    torch.cuda.empty_cache()


def decode_selections(batch: int, nb: int, frac: float, gen, rotate: int = ROTATE):
    """[(sel_blocks, sel_count)] in logical block ids over ``nb`` blocks per
    sequence: all of them (one entry) for ``frac == 1``, else ``rotate``
    different random selections of ``frac`` of the blocks, first and last
    always included, so that L2 never holds the next call's blocks."""
    if frac >= 1.0:
        sel = torch.arange(nb, dtype=torch.int32, device="cuda").expand(batch, HKV, nb).contiguous()
        return [(sel, torch.full((batch, HKV), nb, dtype=torch.int32, device="cuda"))]
    keep = max(2, int(nb * frac))
    out = []
    for _ in range(rotate):
        scores = torch.rand(batch, HKV, nb, device="cuda", generator=gen)
        scores[..., 0] = scores[..., -1] = 2.0
        out.append((scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32),
                    torch.full((batch, HKV), keep, dtype=torch.int32, device="cuda")))
    return out


def bench_decode(n: int, batch: int, flex, gen, copy_bps: float, rep_ms: int, vllm_attn=None) -> list[Result]:
    from casakv_kernels.sparse_decode import (
        SparseDecodeWorkspace, physical_selection, sparse_paged_decode)
    from casakv_kernels.sparse_decode_reference import sparse_paged_decode_ref

    kv, table = paged_kv(batch, n, gen)
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda", generator=gen)
    seq_lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    k, v = contiguous_kv(kv, table)
    qb = q.unsqueeze(2)
    scale = D ** -0.5
    sdpa_ms = bench_graph([lambda: F.scaled_dot_product_attention(qb, k, v, enable_gqa=True, scale=scale)])
    nb = n // PAGE
    workspace = SparseDecodeWorkspace.allocate(batch, HQ, D, device="cuda")
    results = []
    for name, frac in (("dense", 1.0), ("select-10%", 0.1)):
        sels = decode_selections(batch, nb, frac, gen)
        out = torch.empty_like(q)

        def call(sel, cnt):
            return lambda: sparse_paged_decode(q, kv, table, seq_lens, sel, cnt, scale, out, workspace=workspace,
                                               sel_physical=True)

        # block ids translated once per batch (every layer reuses them), outside the timing
        given = [(physical_selection(s_, table), c_) for s_, c_ in sels]
        casakv_ms = bench_graph([call(*g) for g in given])
        sel, cnt = sels[0]
        call(*given[0])()
        sub = slice(0, min(batch, 2))
        ref = sparse_paged_decode_ref(q[sub], kv, table[sub], seq_lens[sub], sel[sub], cnt[sub], scale)
        err = rel_err(out[sub], ref)
        selected_tokens = int(cnt.sum()) * PAGE
        bytes_read = selected_tokens * 2 * D * 2
        flex_ms = None
        if frac < 1.0:
            sel_mask = torch.zeros(batch, HKV, nb, dtype=torch.bool, device="cuda")
            sel_mask.scatter_(2, sel.long(), True)

            def mod(b, h, qi, ki):
                return sel_mask[b, h // (HQ // HKV), ki // PAGE]

            from torch.nn.attention.flex_attention import create_block_mask

            bm = create_block_mask(mod, batch, HQ, 1, n, device="cuda", BLOCK_SIZE=128, _compile=True)
            flex_ms = _try_bench(lambda: flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale), rep_ms)
        else:
            flex_ms = _try_bench(lambda: flex(qb, k, v, enable_gqa=True, scale=scale), rep_ms)
        res = Result("decode", n, batch, name, round(frac, 4), casakv_ms, sdpa_ms, flex_ms,
                     bytes_read, bytes_read / (casakv_ms / 1e3) / copy_bps, err)
        res.copy_same_ms = copy_same_bytes(bytes_read)
        res.copy_same_fraction = bytes_read / (res.copy_same_ms / 1e3) / copy_bps
        res.read_same_ms = read_same_bytes(bytes_read)
        res.read_same_fraction = bytes_read / (res.read_same_ms / 1e3) / copy_bps
        if frac == 1.0:
            _add_mem_efficient(res, qb, k, v, False, scale, out.unsqueeze(2), lambda f: bench_graph([f]))
            qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
            _add_vllm(res, vllm_attn, q, kv, table, qsl, seq_lens, 1, scale, out, lambda f: bench_graph([f]))
        results.append(res)
    del kv, k, v
    torch.cuda.empty_cache()
    return results


SECTIONS = ("decode", "prefill", "compacted", "layer", "estimated", "served")


def run(json_path: Path, md_path: Path | None, quick: bool = False, progress=print,
        command: str = "casakv bench kernels", vllm_kernel: str | None = None, sections=SECTIONS,
        profile_event: int = 0) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("casakv bench kernels needs a CUDA GPU (this machine has none)")
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled graph per (mask, shape): more than dynamo's default 8
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rep = 50 if quick else 200
    t0 = time.time()
    copy_bps = _copy_bandwidth()
    progress(f"copy bandwidth {copy_bps / 1e12:.2f} TB/s")
    from casakv_vllm.tools.bench.vllm_triton import load

    vllm_attn = load(vllm_kernel)
    progress("vLLM's unified_attention: " + ("timed as a peer" if vllm_attn else "not available"))
    from casakv_vllm.tools.bench.compacted import bench_compacted

    results: list[Result] = []
    compacted: list = []
    prefill_lens = (8192,) if quick else (8192, 32768, 131072)
    decode_cases = ((32768, 1),) if quick else ((32768, 1), (32768, 16), (131072, 1), (131072, 16))
    compacted_cases = ((32768, 1),) if quick else tuple((n, b) for n in (32768, 131072) for b in (1, 16, 64))
    layer_cases = ((8192, 2, "snapkv"),) if quick else (
        (32768, 1, "snapkv"), (32768, 16, "snapkv"), (131072, 1, "snapkv"), (32768, 1, "casakv"), (32768, 16, "casakv"))
    layers: list = []
    estimated: list = []
    served: list = []
    served_cases = ((8192, 8192),) if quick else ((32768, 32768), (32768, 8192), (131072, 131072), (131072, 8192))
    # decode first (cheap), then prefill; results are written after every step
    steps = ([("decode", n, b) for n, b in decode_cases if "decode" in sections]
             + [("compacted", n, b) for n, b in compacted_cases if "compacted" in sections]
             + [("layer", n, (b, policy)) for n, b, policy in layer_cases if "layer" in sections]
             + [("prefill", n, 1) for n in prefill_lens if "prefill" in sections]
             + [("estimated", n, 1) for n in prefill_lens[1:] or prefill_lens if "estimated" in sections]
             + [("served", n, c) for n, c in served_cases if "served" in sections])
    for kind, n, b in steps:
        if kind == "decode":
            results += bench_decode(n, b, flex, gen, copy_bps, rep, vllm_attn)
        elif kind == "compacted":
            compacted.append(bench_compacted(n, b, gen, copy_bps))
        elif kind == "layer":
            from casakv_vllm.tools.bench.layer import bench_layer

            b, policy = b
            layers.append(bench_layer(n, b, policy, profile=profile_event))
        elif kind == "estimated":
            from casakv_vllm.tools.bench.estimated import bench_estimated

            estimated.append(bench_estimated(n, gen, rep, vllm_attn))
        elif kind == "served":
            from casakv_vllm.tools.bench.served_prefill import bench_served

            served.append(bench_served(n, b, gen, rep, vllm_attn=vllm_attn))
        else:
            results += bench_prefill(n, ("causal", "a-shape", "vertical-slash"), flex, gen, rep, vllm_attn)
        progress(f"{kind} N={n} B={b} done ({time.time() - t0:.0f}s)")
        _write(json_path, md_path, results, copy_bps, t0, command, compacted, layers, estimated, served)
    return _write(json_path, md_path, results, copy_bps, t0, command, compacted, layers, estimated, served)


def _write(json_path: Path, md_path: Path | None, results: list[Result], copy_bps: float, t0: float,
           command: str = "casakv bench kernels", compacted: list | None = None, layers: list | None = None,
           estimated: list | None = None, served: list | None = None) -> dict:
    import triton

    doc = {
        "command": f"{command} --json {json_path.name}" + (f" --md {md_path.name}" if md_path else "")
                   + " (run by scripts/gpu-suite.sh)",
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "copy_TBps": copy_bps / 1e12,
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16", "block_size": PAGE},
        "results": [asdict(r) for r in results],
        "compacted": [asdict(r) for r in compacted or []],
        "layer": [asdict(r) for r in layers or []],
        "estimated": [asdict(r) for r in estimated or []],
        "served": [asdict(r) for r in served or []],
        "wall_s": time.time() - t0,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1))
    if md_path is not None:
        md_path.write_text(markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    lines = [f"# Kernel benchmark: {doc['gpu']}", "",
             f"`{doc['command']}` (torch {doc['torch']}, triton {doc['triton']}); "
             f"measured copy bandwidth {doc['copy_TBps']:.2f} TB/s. Times are medians in ms.", "",
             "`mem-eff` = SDPA restricted to EFFICIENT_ATTENTION (the kernel xformers' memory-efficient "
             "attention runs), dense cells only.", "",
             "`vLLM` = vLLM's own Triton kernel (`unified_attention`) on the same paged cache (causal prefill, "
             "dense decode). `copy frac` / `read frac` = the HBM fraction of a device copy moving the same bytes / "
             "of one read-only launch reading them, timed like the decode call: for small cells, the ceiling of "
             "one launch at that size.", "",
             "| kind | N | B | mask | density | casakv | SDPA | Flex | mem-eff | vLLM | casakv/Flex | SDPA/casakv "
             "| mem-eff/casakv | vLLM/casakv | HBM frac | copy frac | read frac | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in doc["results"]:
        flex, ours, sdpa = r["flex_ms"], r["casakv_ms"], r["sdpa_ms"]
        me, vl = r.get("mem_efficient_ms"), r.get("vllm_triton_ms")
        lines.append(" | ".join([
            f"| {r['kind']}", str(r["seq_len"]), str(r["batch"]), r["mask"], f"{r['density']:.3f}",
            f"{ours:.3f}", f"{sdpa:.3f}", num(flex, ".3f"), num(me, ".3f"), num(vl, ".3f"),
            num(ours / flex if flex else None, ".2f"), f"{sdpa / ours:.2f}", num(me / ours if me else None, ".2f"),
            num(vl / ours if vl else None, ".2f"), num(r["hbm_fraction"], ".2f"),
            num(r.get("copy_same_fraction"), ".2f"), num(r.get("read_same_fraction"), ".2f"),
            f"{r['rel_err']:.1e} |"]))
    if doc.get("compacted"):
        from casakv_vllm.tools.bench.compacted import markdown as compacted_markdown

        lines += compacted_markdown(doc["compacted"])
    if doc.get("layer"):
        from casakv_vllm.tools.bench.layer import markdown as layer_markdown

        lines += layer_markdown(doc["layer"])
    if doc.get("estimated"):
        from casakv_vllm.tools.bench.estimated import markdown as estimated_markdown

        lines += estimated_markdown(doc["estimated"])
    if doc.get("served"):
        from casakv_vllm.tools.bench.served_prefill import markdown as served_markdown

        lines += served_markdown(doc["served"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m casakv_vllm.tools.bench.kernels``: the same run as ``casakv bench
    kernels``, without importing the rest of the CLI."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m casakv_vllm.tools.bench.kernels")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vllm-kernel", help="folder staged by scripts/stage_vllm_kernel.py (vLLM's Triton kernel)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--profile-event", type=int, default=0, metavar="N",
                    help="layer section: print torch's profiler table (top N ops) of each compaction event")
    a = ap.parse_args(argv)
    run(Path(a.json), Path(a.md) if a.md else None, quick=a.quick, progress=lambda m: print(m, flush=True),
        command="python -m casakv_vllm.tools.bench.kernels", vllm_kernel=a.vllm_kernel,
        sections=tuple(x.strip() for x in a.sections.split(",") if x.strip()), profile_event=a.profile_event)


if __name__ == "__main__":
    main()
