"""Decode over compacted caches (``casakv bench kernels --sections compacted``).

What a request holds after casakv compacts it at 4x (``compress.rule``): its
compacted region (a quarter of its blocks, each KV head's kept tokens in the
leading slots, the rest of the region empty) and its tail block.  The decode
kernel reads only those live blocks, skipping each head's empty slots and its
tail block's evicted tokens (``hole``), as the CUDA path serves it.  Timed
side by side with the same kernel over every block of the uncompacted cache
(dense), at Llama-3-8B attention shapes, plus what one layer's compaction
costs (``casakv::compact_kv`` moving the kept quarter of the tokens).

Both decodes are graph-replayed (``gpu_timing.bench_graph``) over ``ROTATE``
different selections, so L2 does not hold the next call's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_vllm.tools.bench.gpu_timing import (D, DTYPE, HKV, HQ, PAGE, ROTATE, _bench, bench_graph, paged_kv,
                                                rel_err)

RATIO = 0.25  # tokens kept per KV head
CHUNK = 256  # generated tokens between compaction events (CasakvConfig.chunk_size's default)
REPROFILE = 256  # generated tokens between casakv's re-profiles (its reprofile_interval's default)


@dataclass
class CompactedResult:
    kind: str  # "decode-compacted"
    seq_len: int
    batch: int
    ratio: float
    dense_ms: float
    compacted_ms: float
    speedup: float  # dense_ms / compacted_ms
    dense_bytes: int
    compacted_bytes: int
    dense_hbm_fraction: float
    compacted_hbm_fraction: float
    rel_err: float
    compact_layer_ms: float  # one layer's compaction of one request (casakv::compact_kv)
    compact_share: float  # compact_layer_ms * batch / CHUNK over compacted_ms: per decode step, amortised
    reprofile_layer_ms: float = 0.0  # casakv's re-profiling of one request at one layer (``estimated_recall``)
    reprofile_share: float = 0.0  # reprofile_layer_ms * batch / REPROFILE over compacted_ms, amortised


def _compacted_selections(table: torch.Tensor, n: int, gen, rotate: int = ROTATE):
    """``rotate`` compacted layouts of every request: ``[B, Hkv, live]`` physical ids (the region's blocks,
    then the tail block), their counts, and each head's hole and tail skip bits ``[B, Hkv, 3]``."""
    batch, nb = table.shape
    slots = int(n * RATIO)
    region = -(-slots // PAGE)  # head_end / PAGE
    out = []
    for _ in range(rotate):
        pick = torch.rand(batch, nb - 1, device="cuda", generator=gen).argsort(1)[:, :region].sort(1).values
        ids = torch.cat([table.gather(1, pick), table[:, -1:]], 1)  # the region, then the tail block
        sel = ids.unsqueeze(1).expand(batch, HKV, region + 1).contiguous()
        cnt = torch.full((batch, HKV), region + 1, dtype=torch.int32, device="cuda")
        hole = torch.zeros(batch, HKV, 3, dtype=torch.int32, device="cuda")
        kept = slots - torch.randint(0, PAGE, (batch, HKV), device="cuda", generator=gen)  # heads keep <= slots
        hole[..., 0] = kept
        hole[..., 1] = region * PAGE
        hole[..., 2] = torch.randint(0, 1 << 8, (batch, HKV), device="cuda", generator=gen)  # tail's evicted
        out.append((sel, cnt, hole))
    return out


def bench_compacted(n: int, batch: int, gen, copy_bps: float) -> CompactedResult:
    from casakv_kernels.compaction import allocate_scratch, compact_kv
    from casakv_kernels.sparse_decode import (SparseDecodeWorkspace, dense_physical_selection, sparse_paged_decode)
    from casakv_kernels.sparse_decode_reference import sparse_paged_decode_ref

    kv, table = paged_kv(batch, n, gen)
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda", generator=gen)
    seq_lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    ws = SparseDecodeWorkspace.allocate(batch, HQ, D, device="cuda")
    out = torch.empty_like(q)
    dense_sel, dense_cnt = dense_physical_selection(table, seq_lens, PAGE, HKV)
    dense_ms = bench_graph([lambda: sparse_paged_decode(q, kv, table, seq_lens, dense_sel, dense_cnt, scale, out,
                                                        workspace=ws, sel_physical=True)])
    sels = _compacted_selections(table, n, gen)

    def call(sel, cnt, hole):
        return lambda: sparse_paged_decode(q, kv, table, seq_lens, sel, cnt, scale, out, workspace=ws,
                                           sel_physical=True, hole=hole)

    compacted_ms = bench_graph([call(*s) for s in sels])
    sel, cnt, hole = sels[0]
    call(*sels[0])()
    sub = slice(0, min(batch, 2))
    # the reference reads logical ids: a table whose row is the selection itself
    live = sel[sub, 0]
    ref = sparse_paged_decode_ref(q[sub], kv, live, seq_lens[sub] * 0 + live.shape[1] * PAGE,
                                  torch.arange(live.shape[1], dtype=torch.int32, device="cuda").expand(
                                      live.shape[0], HKV, live.shape[1]).contiguous(), cnt[sub], scale, hole=hole[sub])
    err = rel_err(out[sub], ref)
    token_bytes = HKV * 2 * D * 2
    dense_bytes = batch * n * token_bytes
    compacted_bytes = batch * int(cnt[0, 0]) * PAGE * token_bytes
    # one layer's compaction of one request: the kept quarter of its prompt, per KV head, to the front
    kept = int(n * RATIO)
    keep = torch.rand(1, HKV, n - PAGE, device="cuda", generator=gen).argsort(-1)[..., :kept].sort(-1).values
    keep = keep.to(torch.int32).contiguous()
    keep_count = torch.full((1, HKV), kept, dtype=torch.int32, device="cuda")
    scratch = allocate_scratch(kv, keep)
    compact_ms = _bench(lambda: compact_kv(kv, table[:1], keep, keep_count, scratch), 50)
    reprofile_ms = _bench_reprofile(n, kept, gen)
    del kv, scratch
    torch.cuda.empty_cache()
    return CompactedResult(
        "decode-compacted", n, batch, RATIO, dense_ms, compacted_ms, dense_ms / compacted_ms, dense_bytes,
        compacted_bytes, dense_bytes / (dense_ms / 1e3) / copy_bps, compacted_bytes / (compacted_ms / 1e3) / copy_bps,
        err, compact_ms, compact_ms * batch / CHUNK / compacted_ms, reprofile_ms,
        reprofile_ms * batch / REPROFILE / compacted_ms)


def _bench_reprofile(n: int, kept: int, gen, device: str = "cuda", timer=_bench) -> float:
    """One layer's re-profile of one request as casakv runs it at an event: the event query's recall over
    the ``kept`` live keys against the summaries of the ``n - kept`` evicted ones, and the program update."""
    from casakv_vllm.observe.estimate import FULL
    from casakv_vllm.policies.casakv import estimated_recall, evicted_summary

    keys = torch.randn(HKV, n, D, dtype=DTYPE, device=device, generator=gen)
    keep = torch.rand(HKV, n, device=device, generator=gen) < RATIO
    summary = evicted_summary(keys, keep)
    live = keys[:, :kept].contiguous()
    q = torch.randn(HQ, 1, D, dtype=DTYPE, device=device, generator=gen)
    allowed = torch.ones(HKV, 1, kept, dtype=torch.bool, device=device)
    program = torch.zeros(HKV, dtype=torch.long, device=device)

    def reprofile():
        recall = estimated_recall(q, live, allowed, summary, D ** -0.5)
        return torch.where(recall < 0.95, FULL, program)
    return timer(reprofile, 50)


def markdown(results: list[dict]) -> list[str]:
    """Markdown lines of the compacted-decode table."""
    lines = ["", "## Decode over a 4x-compacted cache", "",
             f"Per request: a quarter of its blocks (each head's kept tokens, the rest of the region empty) plus "
             f"its tail block, read by the decode kernel with each head's hole and tail skip bits; dense = the same "
             f"kernel over every block. `compact/step` = one layer's compaction of the batch, once every {CHUNK} "
             f"generated tokens, over one compacted decode step of that layer; `reprofile/step` = casakv's "
             f"re-profile of the batch at one layer (recall against the evicted blocks' summaries), once every "
             f"{REPROFILE} generated tokens, over the same step.", "",
             "| N | B | dense ms | compacted ms | speedup | dense MB | compacted MB | dense HBM frac "
             "| compacted HBM frac | compact ms (1 req, 1 layer) | compact/step | reprofile ms (1 req, 1 layer) "
             "| reprofile/step | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seq_len']} | {r['batch']} | {r['dense_ms']:.3f} | {r['compacted_ms']:.3f} | "
                     f"{r['speedup']:.2f} | {r['dense_bytes'] / 1e6:.0f} | {r['compacted_bytes'] / 1e6:.0f} | "
                     f"{r['dense_hbm_fraction']:.2f} | {r['compacted_hbm_fraction']:.2f} | "
                     f"{r['compact_layer_ms']:.3f} | {r['compact_share']:.3%} | {r.get('reprofile_layer_ms', 0):.3f} | "
                     f"{r.get('reprofile_share', 0):.3%} | {r['rel_err']:.1e} |")
    return lines
