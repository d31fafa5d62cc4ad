"""Tile/launch-config sweep for casakv's prefill and decode kernels (one GPU call).

Imports the kernels straight from this checkout (no install, no CUDA op build),
checks every variant against FlexAttention (prefill) or the fp32 reference
(decode) and times it with triton.testing.do_bench (median, L2 flushed).
Usage: python scripts/kernel_sweep.py [--out DIR] [--only prefill|wide|decode|decode-b1|decode-var|variants|profile]
Writes DIR/sweep.json and prints one table per part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _shim():
    shim = Path("/tmp/casakv_shim/casakv_vllm")
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").touch()
    for name, target in (("triton_kernels", REPO / "triton_kernels"),
                         ("bench", REPO / "casakv_vllm" / "bench")):
        link = shim / name
        if not link.exists():
            link.symlink_to(target)
    sys.path.insert(0, str(shim.parent))


_shim()
from casakv_vllm.tools.bench.kernels import (  # noqa: E402  (the benchmark's inputs, masks and checks)
    MASK_MODS as MODS, bench_graph, bench_patterns as patterns, contiguous_kv as contiguous, copy_same_bytes,
    decode_selections, paged_kv, read_same_bytes, rel_err as rel)
from casakv_kernels.paged_attention import paged_attention  # noqa: E402
from casakv_kernels.sparse_decode import (  # noqa: E402
    SparseDecodeWorkspace, choose_num_splits, physical_selection, sparse_paged_decode)
from casakv_kernels.sparse_decode_reference import sparse_paged_decode_ref  # noqa: E402
from casakv_kernels.sparse_index import build_prefill_index  # noqa: E402
from casakv_kernels.sparse_prefill import sparse_paged_attention  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16


def bench(fn, rep=100):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def partition(index):
    """Emulate a partitioned index in torch: full tiles first (ascending), the
    partial ones at the end of each row."""
    from dataclasses import replace
    maxt = index.tile_idx.shape[-1]
    pos = torch.arange(maxt, device=index.tile_idx.device)
    valid = pos < index.tile_count[..., None]
    full = valid & (index.tile_full != 0)
    part = valid & ~full
    fpos = torch.cumsum(full.to(torch.int32), -1) - 1
    ppos = maxt - 1 - (torch.cumsum(part.to(torch.int32), -1) - 1)
    dest = torch.where(full, fpos, torch.where(part, ppos, maxt))  # maxt = dump
    idx = torch.full(index.tile_idx.shape[:-1] + (maxt + 1,), -1, dtype=torch.int32, device=pos.device)
    idx.scatter_(-1, dest.long(), index.tile_idx)
    return replace(index, tile_idx=idx[..., :maxt].contiguous(),
                   tile_nfull=full.sum(-1, dtype=torch.int32))


PREFILL_CFGS = [  # (BLOCK_M, BLOCK_N, warps, stages)
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
]


def prefill_inputs(gen, n):
    """One random sequence of n tokens: paged KV + table, q, offsets, contiguous K/V, SDPA-shaped q, scale."""
    kv, table = paged_kv(1, n, gen)
    q = torch.randn(n, HQ, D, dtype=DT, device="cuda", generator=gen)
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    sl = torch.tensor([n], dtype=torch.int32, device="cuda")
    k, v = contiguous(kv, table)
    return kv, table, q, qsl, sl, k, v, q.transpose(0, 1).unsqueeze(0), D ** -0.5


def sweep_prefill(gen, rows, n, masks, cfgs, flex, do_dense):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    import torch.nn.functional as F
    kv, table, q, qsl, sl, k, v, qb, scale = prefill_inputs(gen, n)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        sdpa = bench(lambda: F.scaled_dot_product_attention(qb, kk, vv, is_causal=True))
        del kk, vv
    rows.append(dict(part="prefill", n=n, mask="-", variant="sdpa", ms=sdpa))
    for name in masks:
        pat = patterns(name, n)
        bm = create_block_mask(MODS[name], None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
        fx = bench(lambda: flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale))
        ref = flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale)[0].transpose(0, 1)
        rows.append(dict(part="prefill", n=n, mask=name, variant="flex", ms=fx))
        print(f"prefill {n} {name}: sdpa {sdpa:.3f} flex {fx:.3f}", flush=True)
        indexes = {}
        for cfg in cfgs:
            bmm, bn, w, st = cfg
            bq = bmm // 4
            if (bq, bn) not in indexes:
                idx = build_prefill_index(pat, qsl, sl, n, n, bq, bn)
                indexes[(bq, bn)] = (idx, partition(idx))
            for part_mode in (False,):  # build_prefill_index partitions already
                index = indexes[(bq, bn)][1 if part_mode else 0]
                out = torch.full_like(q, float("nan"))
                try:
                    fn = lambda: sparse_paged_attention(q, kv, table, qsl, sl, scale, out, pat, index,  # noqa: E731
                                                        n, n, launch=(w, st))
                    fn()
                    err = rel(out, ref)
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001
                    print("  fail", cfg, part_mode, type(e).__name__, str(e)[:200])
                    continue
                rows.append(dict(part="prefill", n=n, mask=name, variant=f"sparse{cfg}{'P' if part_mode else ''}",
                                 ms=ms, err=err, ratio_flex=ms / fx))
                print(f"  sparse {cfg} part={part_mode}: {ms:.3f} ms  x{ms / fx:.2f} flex  err {err:.1e}", flush=True)
        if name == "causal" and do_dense:
            for cfg in cfgs:
                out = torch.full_like(q, float("nan"))
                try:
                    fn = lambda: paged_attention(q, kv, table, qsl, sl, scale, out, n, n, config=cfg)  # noqa: E731
                    fn()
                    err = rel(out, ref)
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001
                    print("  fail dense", cfg, type(e).__name__, str(e)[:200])
                    continue
                rows.append(dict(part="prefill", n=n, mask="causal", variant=f"dense{cfg}", ms=ms, err=err,
                                 ratio_flex=ms / fx, ratio_sdpa=ms / sdpa))
                print(f"  dense {cfg}: {ms:.3f} ms  x{ms / sdpa:.2f} sdpa  err {err:.1e}", flush=True)
        del indexes, bm
        torch.cuda.empty_cache()
    del kv, k, v


def sweep_wide(gen, rows, n, masks, flex, reps):
    """The sparse prefill kernel at the prefill table's tiles ("table") and at
    WIDE_TILES ("wide"), one launch each, both against Flex on the same mask,
    timed alternately ``reps`` times (medians)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from casakv_kernels.sparse_prefill import WIDE_TILES, plan_blocks
    kv, table, q, qsl, sl, k, v, qb, scale = prefill_inputs(gen, n)
    plans = {"table": plan_blocks(HQ // HKV, D, n), "wide": (WIDE_TILES[0] // (HQ // HKV), WIDE_TILES[1])}
    for name in masks:
        t0 = time.time()
        pat = patterns(name, n)
        bm = create_block_mask(MODS[name], None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
        ref = flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale)[0].transpose(0, 1)
        print(f"  {name}: block mask + Flex reference {time.time() - t0:.0f}s", flush=True)
        fns, errs = {}, {}
        for key, plan in plans.items():
            index = build_prefill_index(pat, qsl, sl, n, n, *plan)
            out = torch.full_like(q, float("nan"))
            fns[key] = (lambda index=index, out=out:  # noqa: E731
                        sparse_paged_attention(q, kv, table, qsl, sl, scale, out, pat, index, n, n))
            fns[key]()
            errs[key] = rel(out, ref)
            print(f"  {key} plan {plan}: first call done {time.time() - t0:.0f}s", flush=True)
        times = {"flex": [], **{key: [] for key in plans}}
        for _ in range(reps):
            times["flex"].append(bench(lambda: flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale)))
            for key in plans:
                times[key].append(bench(fns[key]))
        print(f"  timed {time.time() - t0:.0f}s", flush=True)
        med = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
        rows.append(dict(part="wide", n=n, mask=name, times=times, median=med, err=errs,
                         table_flex=med["table"] / med["flex"], wide_flex=med["wide"] / med["flex"]))
        print(f"wide {n} {name}: flex {med['flex']:.3f}  table {med['table']:.3f} (x{med['table'] / med['flex']:.3f})"
              f"  wide {med['wide']:.3f} (x{med['wide'] / med['flex']:.3f})  err {errs['table']:.1e} "
              f"{errs['wide']:.1e}  rounds {times}", flush=True)
        del fns, bm
        torch.cuda.empty_cache()
    del kv, k, v
    torch.cuda.empty_cache()


# Module switches of sparse_prefill swept by --only variants: (name, {switch: value}).
# A third element, (num_warps, num_stages), overrides the launch config.
VARIANTS = [
    ("default", dict(REVERSE_Q=False), None),
    ("reverse-q", dict(REVERSE_Q=True), None),
]


def compiled_kernels(jit_fn):
    """{id: CompiledKernel} of a @triton.jit function, all devices."""
    found = {}
    for cache in getattr(jit_fn, "device_caches", {}).values():
        kc = cache[0] if isinstance(cache, tuple) else cache
        for k in getattr(kc, "values", lambda: [])():
            found[id(k)] = k
    return found


def kernel_stats(k, dump=None):
    """Registers, spills, shared memory of a compiled kernel (+ TTGIR op counts);
    writes its TTGIR to ``dump``."""
    try:
        k._init_handles()
    except Exception:  # noqa: BLE001
        pass
    ttgir = k.asm.get("ttgir", "")
    if dump is not None:
        Path(dump).write_text(ttgir)
    ops = {op: ttgir.count(op) for op in ("async_copy_global_to_local", "warp_group_dot ", "local_alloc",
                                          "local_store", "async_wait", "tt.load", "async_tma")}
    return dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                shared=getattr(k.metadata, "shared", None), ops=ops)


def profile_target(gen, flex, n, mask, runs=3):
    """Run casakv's sparse prefill and Flex on one mask ``runs`` times each
    (for ``ncu --launch-skip``); prints both times."""
    from torch.nn.attention.flex_attention import create_block_mask
    from casakv_kernels.sparse_prefill import plan_blocks
    kv, table, q, qsl, sl, k, v, qb, scale = prefill_inputs(gen, n)
    bq, bn = plan_blocks(HQ // HKV, D, n)
    pat = patterns(mask, n)
    index = build_prefill_index(pat, qsl, sl, n, n, bq, bn)
    bm = create_block_mask(MODS[mask], None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
    out = torch.empty_like(q)
    for _ in range(runs):
        sparse_paged_attention(q, kv, table, qsl, sl, scale, out, pat, index, n, n)
    for _ in range(runs):
        flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale)
    torch.cuda.synchronize()


def sweep_variants(gen, rows, n, masks, flex, reps=2):
    """Kernel variants of the sparse prefill kernel at its default tiles
    (the module switches in ``VARIANTS``), each checked against Flex and
    timed ``reps`` times (interleaved, to see the spread)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from casakv_kernels import sparse_prefill
    from casakv_kernels.sparse_prefill import plan_blocks
    kv, table, q, qsl, sl, k, v, qb, scale = prefill_inputs(gen, n)
    bq, bn = plan_blocks(HQ // HKV, D, n)
    variants = [name for name, _, _ in VARIANTS]
    settings = {name: sw for name, sw, _ in VARIANTS}
    launches = {name: ln for name, _, ln in VARIANTS}
    defaults = {k: getattr(sparse_prefill, k) for sw in settings.values() for k in sw}
    for name in masks:
        pat = patterns(name, n)
        index = build_prefill_index(pat, qsl, sl, n, n, bq, bn)
        bm = create_block_mask(MODS[name], None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
        fx = bench(lambda: flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale))
        ref = flex(qb, k, v, block_mask=bm, enable_gqa=True, scale=scale)[0].transpose(0, 1)
        rows.append(dict(part="variants", n=n, mask=name, variant="flex", ms=fx))
        times = {vv: [] for vv in variants}
        errs = {}
        for r in range(reps):
            for vv in variants:
                for k_, v_ in {**defaults, **settings[vv]}.items():
                    setattr(sparse_prefill, k_, v_)
                out = torch.full_like(q, float("nan"))
                fn = lambda: sparse_paged_attention(q, kv, table, qsl, sl, scale, out, pat, index, n, n,  # noqa: E731
                                                    launch=launches[vv])
                try:
                    if r == 0:
                        before = compiled_kernels(sparse_prefill._sparse_paged_attention_kernel)
                        fn()
                        errs[vv] = rel(out, ref)
                        new = [k_ for i_, k_ in compiled_kernels(sparse_prefill._sparse_paged_attention_kernel).items()
                               if i_ not in before]
                        for k_ in new:
                            st_ = kernel_stats(k_, Path(os.environ.get("OUT", "/tmp")) /
                                               f"ttgir-{vv.replace('/', '_')}-{name}.txt")
                            rows.append(dict(part="kernel-stats", n=n, mask=name, variant=vv, **st_))
                            print(f"  stats {vv} {name}: {st_}", flush=True)
                    times[vv].append(bench(fn))
                except Exception as e:  # noqa: BLE001
                    print("  fail", vv, type(e).__name__, str(e)[:300], flush=True)
        for k_, v_ in defaults.items():
            setattr(sparse_prefill, k_, v_)
        for vv in variants:
            if not times[vv]:
                continue
            ms = min(times[vv])
            rows.append(dict(part="variants", n=n, mask=name, variant=vv, ms=ms,
                             all_ms=times[vv], err=errs[vv], ratio_flex=ms / fx))
            print(f"variants {n} {name} {vv}: {' '.join(f'{t:.3f}' for t in times[vv])} ms"
                  f"  x{ms / fx:.3f} flex ({fx:.3f})  err {errs[vv]:.1e}", flush=True)
        del index, bm
        torch.cuda.empty_cache()
    del kv, k, v
    torch.cuda.empty_cache()


DEC_CFGS = [(32, 4, 3), (32, 2, 3), (16, 4, 3), (64, 4, 3), (32, 4, 4), (16, 2, 3), (64, 2, 3)]
SPLITS = [None, 32, 48, 66, 96, 128]


def decode_inputs(gen, n, batch):
    """Paged KV + table, q, seq_lens, blocks per sequence and a split workspace."""
    kv, table = paged_kv(batch, n, gen)
    q = torch.randn(batch, HQ, D, dtype=DT, device="cuda", generator=gen)
    sl = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    return kv, table, q, sl, n // PAGE, SparseDecodeWorkspace.allocate(batch, HQ, D, device="cuda")


def sweep_decode(gen, rows, copy_bps, cases=((32768, 1), (131072, 1), (32768, 16), (131072, 16)),
                 cfgs=None, splits_list=None):
    cfgs = cfgs or DEC_CFGS
    splits_list = splits_list or SPLITS
    for n, batch in cases:
        kv, table, q, sl, nb, ws = decode_inputs(gen, n, batch)
        for name, frac in (("dense", 1.0), ("select-10%", 0.1)):
            sels = [sel for sel, _ in decode_selections(batch, nb, frac, gen)]
            keep = sels[0].shape[-1]
            cnt = torch.full((batch, HKV), keep, dtype=torch.int32, device="cuda")
            sub = slice(0, min(batch, 2))
            ref = sparse_paged_decode_ref(q[sub], kv, table[sub], sl[sub], sels[0][sub], cnt[sub], D ** -0.5)
            byts = batch * HKV * keep * PAGE * 2 * D * 2
            heur = choose_num_splits(batch, HKV, keep, PAGE, 132)
            if byts < 256 * 1024**2:
                cms = copy_same_bytes(byts)
                rows.append(dict(part="decode-copy", n=n, batch=batch, mask=name, ms=cms,
                                 hbm=byts / (cms / 1e3) / copy_bps))
                print(f"decode {n} B={batch} {name}: same-bytes copy {cms * 1e3:.1f} us "
                      f"hbm {byts / (cms / 1e3) / copy_bps:.2f}", flush=True)
            best = None
            for (bn, w, st), sp in ((c, sp) for c in cfgs for sp in splits_list):
                if batch == 16 and sp is not None:
                    continue
                out = torch.full_like(q, float("nan"))

                def call(sel, sp=sp, bn=bn, w=w, st=st, out=out):
                    return lambda: sparse_paged_decode(q, kv, table, sl, sel, cnt, D ** -0.5, out, workspace=ws,
                                                       num_splits=sp, block_n=bn, num_warps=w, num_stages=st)
                call(sels[0])()
                err = rel(out[sub], ref)
                ms = bench_graph([call(x) for x in sels], reps=10)
                frac_hbm = byts / (ms / 1e3) / copy_bps
                rows.append(dict(part="decode", n=n, batch=batch, mask=name, bn=bn, warps=w, stages=st,
                                 splits=sp if sp else heur, heur=sp is None, ms=ms,
                                 hbm=frac_hbm, err=err))
                if best is None or ms < best[0]:
                    best = (ms, bn, w, st, sp if sp else heur, frac_hbm)
                print(f"decode {n} B={batch} {name} {(bn, w, st)} splits {sp or f'heur {heur}'}: "
                      f"{ms * 1e3:.1f} us hbm {frac_hbm:.2f} err {err:.1e}", flush=True)
            print(f"  best {best[0] * 1e3:.1f} us bn={best[1]} w={best[2]} st={best[3]} splits={best[4]} "
                  f"hbm {best[5]:.2f}", flush=True)
        del kv, ws
        torch.cuda.empty_cache()


def sweep_decode_variants(gen, rows, copy_bps):
    """Physical block ids (no block-table load per tile) x PDL merge launch,
    over tiles and split counts; graph-timed like the benchmark."""
    cfgs = [(32, 4, 3), (64, 4, 3), (32, 4, 4), (16, 4, 4), (64, 4, 4)]
    for n, batch in ((131072, 1), (32768, 1), (32768, 16), (131072, 16)):
        kv, table, q, sl, nb, ws = decode_inputs(gen, n, batch)
        for name, frac in (("select-10%", 0.1), ("dense", 1.0)):
            sels = [sel for sel, _ in decode_selections(batch, nb, frac, gen)]
            keep = sels[0].shape[-1]
            phys = [physical_selection(x, table) for x in sels]
            cnt = torch.full((batch, HKV), keep, dtype=torch.int32, device="cuda")
            sub = slice(0, min(batch, 2))
            ref = sparse_paged_decode_ref(q[sub], kv, table[sub], sl[sub], sels[0][sub], cnt[sub], D ** -0.5)
            byts = batch * HKV * keep * PAGE * 2 * D * 2
            heur = choose_num_splits(batch, HKV, keep, PAGE, 132)
            if batch == 1:
                cms = copy_same_bytes(byts)
                rms = read_same_bytes(byts)
                rows.append(dict(part="decode-ceiling", n=n, batch=batch, mask=name, copy_ms=cms, read_ms=rms,
                                 copy_hbm=byts / (cms / 1e3) / copy_bps, read_hbm=byts / (rms / 1e3) / copy_bps))
                print(f"decode {n} B={batch} {name}: same-bytes copy {cms * 1e3:.1f} us "
                      f"(hbm {byts / (cms / 1e3) / copy_bps:.2f}), read-only {rms * 1e3:.1f} us "
                      f"(hbm {byts / (rms / 1e3) / copy_bps:.2f})", flush=True)
            small = frac == 1.0 or batch == 16
            best = None
            for ph in (False, True):
                for pdl in (False, True):
                    for (bn, w, st) in (cfgs[:1] if small else cfgs):
                        for sp in ((None,) if small else (None, 33, 128)):
                            out = torch.full_like(q, float("nan"))
                            src = phys if ph else sels

                            def call(sel, sp=sp, bn=bn, w=w, st=st, out=out, ph=ph, pdl=pdl):
                                return lambda: sparse_paged_decode(
                                    q, kv, table, sl, sel, cnt, D ** -0.5, out, workspace=ws, num_splits=sp,
                                    block_n=bn, num_warps=w, num_stages=st, sel_physical=ph, pdl=pdl)
                            call(src[0])()
                            err = rel(out[sub], ref)
                            ms = bench_graph([call(x) for x in src], reps=10)
                            hbm = byts / (ms / 1e3) / copy_bps
                            rows.append(dict(part="decode-var", n=n, batch=batch, mask=name, phys=ph, pdl=pdl,
                                             bn=bn, warps=w, stages=st, splits=sp or heur, ms=ms, hbm=hbm,
                                             err=err))
                            tag = f"phys={int(ph)} pdl={int(pdl)} {(bn, w, st)} splits {sp or f'heur {heur}'}"
                            if best is None or ms < best[0]:
                                best = (ms, tag, hbm)
                            print(f"decode {n} B={batch} {name} {tag}: {ms * 1e3:.1f} us hbm {hbm:.2f} "
                                  f"err {err:.1e}", flush=True)
            print(f"  best {best[0] * 1e3:.1f} us {best[1]} hbm {best[2]:.2f}", flush=True)
        del kv, ws
        torch.cuda.empty_cache()


def sweep_decode_gather(gen, rows, copy_bps):
    """Read-only gather of the selected pages, no attention: the same
    (physical block, KV head) pages a 10% B=1 decode reads, summed by a
    Triton kernel with the decode's grid (KV heads x splits), its slicing
    and its tile (2 pages).  Separates the cost of the access pattern from
    that of the attention kernel's structure."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_read(kv_ptr, sel_ptr, o_ptr, count, num_splits, stride_blk, stride_head, stride_sh,
                     PAGE: tl.constexpr, ROW: tl.constexpr, BLOCK_N: tl.constexpr):
        h = tl.program_id(0)
        sp = tl.program_id(1)
        per = tl.cdiv(count, num_splits)
        lo = sp * per
        n_tok = tl.maximum(tl.minimum(lo + per, count) - lo, 0) * PAGE
        offs_d = tl.arange(0, ROW)
        acc = tl.zeros([BLOCK_N, ROW], dtype=tl.float32)
        for t0 in range(0, n_tok, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            tm = offs_t < n_tok
            blk = tl.load(sel_ptr + h * stride_sh + lo + offs_t // PAGE, mask=tm, other=0).to(tl.int64)
            ptr = (kv_ptr + blk[:, None] * stride_blk + h * stride_head + (offs_t % PAGE)[:, None] * ROW
                   + offs_d[None, :])
            acc += tl.load(ptr, mask=tm[:, None], other=0.0).to(tl.float32)
        tl.store(o_ptr + h * num_splits + sp, tl.sum(tl.sum(acc, 1), 0))

    for n in (131072, 32768):
        kv, table, q, sl, nb, ws = decode_inputs(gen, n, 1)
        sels = [physical_selection(sel, table) for sel, _ in decode_selections(1, nb, 0.1, gen)]
        keep = sels[0].shape[-1]
        ident = [torch.arange(keep, dtype=torch.int32, device="cuda").expand(1, HKV, keep).contiguous() + 1
                 + (i * keep) % max(1, nb - keep) for i in range(8)]
        byts = HKV * keep * PAGE * 2 * D * 2
        for splits in (66, 33, 132):
            o = torch.empty(HKV * splits, device="cuda")
            for name, src in (("random pages", sels), ("adjacent pages", ident)):
                for bn in (32, 64):
                    def call(x, bn=bn, o=o, splits=splits):
                        return lambda: _gather_read[(HKV, splits)](
                            kv, x, o, keep, splits, kv.stride(0), kv.stride(1), x.stride(1),
                            PAGE=PAGE, ROW=2 * D, BLOCK_N=bn, num_warps=4, num_stages=3)
                    ms = bench_graph([call(x[0]) for x in src])
                    hbm = byts / (ms / 1e3) / copy_bps
                    rows.append(dict(part="decode-gather", n=n, splits=splits, pages=name, bn=bn, ms=ms, hbm=hbm))
                    print(f"gather-read {n} 10% B=1 {name} splits {splits} bn {bn}: {ms * 1e3:.1f} us hbm {hbm:.2f}",
                          flush=True)
        print(f"  read-only contiguous {read_same_bytes(byts) * 1e3:.1f} us", flush=True)
        del kv
        torch.cuda.empty_cache()


def dump_decode_ir(gen, out_dir, n=131072):
    """Compile the split kernel as the benchmark runs it (B=1, 10%, physical
    ids), print its statistics and write its TTGIR (pipelining: look at the
    loop's async_wait counts)."""
    from casakv_kernels import sparse_decode as sd
    kv, table, q, sl, nb, ws = decode_inputs(gen, n, 1)
    sel, cnt = decode_selections(1, nb, 0.1, gen)[0]
    out = torch.empty_like(q)
    sd.sparse_paged_decode(q, kv, table, sl, sd.physical_selection(sel, table), cnt, D ** -0.5, out,
                           workspace=ws, sel_physical=True)
    torch.cuda.synchronize()
    for k in compiled_kernels(sd._sparse_decode_split_kernel).values():
        print("decode split kernel:", kernel_stats(k, Path(out_dir) / "ttgir-decode-split.txt"), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--only", default="")
    ap.add_argument("--n128", action="store_true")
    ap.add_argument("--mask", default="a-shape")
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--cfgs", default="", help="prefill: 'BM,BN,warps,stages;...' instead of PREFILL_CFGS")
    ap.add_argument("--masks", default="causal,a-shape,vertical-slash", help="prefill masks")
    ap.add_argument("--ns", default="32768", help="wide: comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=3, help="wide: alternating timing rounds")
    a = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a_ = torch.randn(512 * 1024**2, dtype=DT, device="cuda")
    b_ = torch.empty_like(a_)
    copy_bps = 2 * a_.numel() * 2 / (bench(lambda: b_.copy_(a_)) / 1e3)
    del a_, b_
    print(f"copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    rows = []
    t0 = time.time()
    out = Path(a.out) / "sweep.json"
    try:
        if a.only == "profile":
            profile_target(gen, flex, a.n, a.mask)
            return
        if a.only == "variants":
            sweep_variants(gen, rows, 32768, ("causal", "a-shape", "vertical-slash"), flex, reps=4)
            print(f"variants 32k done {time.time() - t0:.0f}s", flush=True)
            sweep_variants(gen, rows, 131072, ("a-shape", "vertical-slash"), flex, reps=2)
            print(f"variants 128k done {time.time() - t0:.0f}s", flush=True)
        if a.only == "wide":
            for n in (int(x) for x in a.ns.split(",")):
                sweep_wide(gen, rows, n, tuple(a.masks.split(",")), flex, a.reps)
                print(f"wide {n} done {time.time() - t0:.0f}s", flush=True)
        if a.only == "decode-ir":
            dump_decode_ir(gen, a.out)
        if a.only == "decode-gather":
            sweep_decode_gather(gen, rows, copy_bps)
        if a.only == "decode-var":
            sweep_decode_variants(gen, rows, copy_bps)
            print(f"decode-var done {time.time() - t0:.0f}s", flush=True)
        if a.only in ("", "decode"):
            sweep_decode(gen, rows, copy_bps)
            print(f"decode done {time.time() - t0:.0f}s", flush=True)
        if a.only == "decode-b1":  # batch 1 only (launch- and latency-bound)
            sweep_decode(gen, rows, copy_bps, cases=((32768, 1), (131072, 1)),
                         cfgs=[(32, 4, 3), (64, 4, 3), (16, 4, 3), (32, 4, 4)],
                         splits_list=[None, 16, 32, 66, 128])
            print(f"decode-b1 done {time.time() - t0:.0f}s", flush=True)
        if a.only in ("", "prefill"):
            cfgs = ([tuple(int(x) for x in c.split(",")) for c in a.cfgs.split(";")] if a.cfgs else PREFILL_CFGS)
            sweep_prefill(gen, rows, a.n, tuple(a.masks.split(",")), cfgs, flex, False)
            print(f"prefill {a.n} done {time.time() - t0:.0f}s", flush=True)
            if a.n128:
                sweep_prefill(gen, rows, 131072, ("a-shape", "vertical-slash"),
                              [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2)], flex, False)
    finally:
        out.write_text(json.dumps(dict(copy_bps=copy_bps, rows=rows), indent=1))
        print(f"wrote {out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
