"""Splits per (request, KV head) of the decode kernel over dense and 4x-compacted caches, swept on the GPU.

`python scripts/compacted_split_sweep.py` prints, per (N, B), each split count's time (graph replay) and the
heuristic's choice (``choose_num_splits``): where the compacted cell's HBM fraction is lost.
"""

from __future__ import annotations

import torch

from casakv_kernels.sparse_decode import (SparseDecodeWorkspace, choose_num_splits, dense_physical_selection,
                                          device_sm_count, sparse_paged_decode)
from casakv_vllm.tools.bench.compacted import _compacted_selections
from casakv_vllm.tools.bench.gpu_timing import D, HKV, HQ, PAGE, _copy_bandwidth, bench_graph, paged_kv

SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    bps = _copy_bandwidth()
    print(f"copy bandwidth {bps / 1e12:.2f} TB/s, SMs {device_sm_count(torch.device('cuda'))}")
    for n, batch in ((32768, 16), (131072, 16), (131072, 1), (131072, 64)):
        kv, table = paged_kv(batch, n, gen)
        q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda", generator=gen)
        seq_lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
        ws = SparseDecodeWorkspace.allocate(batch, HQ, D, device="cuda")
        out = torch.empty_like(q)
        dense_sel, dense_cnt = dense_physical_selection(table, seq_lens, PAGE, HKV)
        sels = _compacted_selections(table, n, gen)
        token_bytes = HKV * 2 * D * 2
        for label, cases, blocks in (("dense", [(dense_sel, dense_cnt, None)], dense_sel.shape[2]),
                                     ("compacted", sels, sels[0][0].shape[2])):
            heur = choose_num_splits(batch, HKV, blocks, PAGE, device_sm_count(q.device))
            row = []
            for s in SPLITS:
                ms = bench_graph([lambda sel=sel, cnt=cnt, hole=hole: sparse_paged_decode(
                    q, kv, table, seq_lens, sel, cnt, 0.08838, out, workspace=ws, sel_physical=True, hole=hole,
                    num_splits=s) for sel, cnt, hole in cases])
                frac = batch * blocks * PAGE * token_bytes / (ms / 1e3) / bps
                row.append(f"{s}:{ms:.3f}ms/{frac:.2f}")
            print(f"N={n} B={batch} {label} (heuristic {heur}): " + "  ".join(row), flush=True)
        del kv, table, ws, sels
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
