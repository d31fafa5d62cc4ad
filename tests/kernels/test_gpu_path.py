"""The backend's CUDA path (kernel choice per batch) and its custom ops under
CUDA graphs and torch.compile.  GPU only: skipped on CPU machines."""

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HKV, GROUP, D, BS = 2, 4, 64, 16


def _batch(q_lens, ctx_lens, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    nb = [-(-s // BS) for s in seq_lens]
    total = sum(nb) + 1
    perm = (torch.randperm(total - 1, device="cuda", generator=g) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(nb), dtype=torch.int32, device="cuda")
    for i, n in enumerate(nb):
        table[i, :n] = torch.tensor([perm.pop() for _ in range(n)], device="cuda")
    cache = torch.randn(total, HKV, BS, 2 * D, device="cuda", generator=g).to(dtype)
    q = torch.randn(sum(q_lens), HKV * GROUP, D, device="cuda", generator=g).to(dtype)
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    return q, cache, table, qsl, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), seq_lens


def _patterns(kind, seq_lens):
    from casakv_vllm.triton_kernels.patterns import PatternBatch
    from casakv_vllm.triton_kernels.sparse_reference import random_patterns

    if kind == "dense":
        return None
    if kind == "streaming":
        return PatternBatch.local(len(seq_lens), HKV, 4, 37, device="cuda")
    return random_patterns(random.Random(7), seq_lens, HKV).to("cuda")


def _reference(q, cache, table, qsl, seq_lens_t, patterns, scale):
    from casakv_vllm.triton_kernels.patterns import PatternBatch
    from casakv_vllm.triton_kernels.sparse_reference import sparse_paged_attention_ref

    p = patterns if patterns is not None else PatternBatch.dense(seq_lens_t.shape[0], HKV, device="cuda")
    return sparse_paged_attention_ref(q, cache, table, qsl, seq_lens_t, scale, p)[0]


@pytest.mark.parametrize("kind", ["dense", "streaming", "random"])
@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_gpu_attention_matches_reference(kind, shape):
    from casakv_vllm.attention.gpu_path import gpu_attention

    q_lens, ctx = ([1, 1, 1], [300, 77, 1000]) if shape == "decode" else ([1, 120, 33], [300, 0, 500])
    q, cache, table, qsl, sl, seq_lens = _batch(q_lens, ctx)
    patterns = _patterns(kind, seq_lens)
    out = torch.full_like(q, float("nan"))
    gpu_attention(q, cache, table, qsl, sl, 0.125, out, max(q_lens), max(seq_lens), patterns, max_batch=8)
    ref = _reference(q, cache, table, qsl, sl, patterns, 0.125)
    err = (out.float() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err < 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("physical", [False, True])
def test_sparse_decode_op_in_cuda_graph(physical):
    import casakv_vllm.ops as ops
    from casakv_vllm.triton_kernels.sparse_decode import (SparseDecodeWorkspace, physical_selection,
                                                          selection_from_patterns)
    from casakv_vllm.triton_kernels.sparse_decode_reference import sparse_paged_decode_ref

    def ids(sel):  # what the kernel is given
        return physical_selection(sel, table) if physical else sel

    q, cache, table, qsl, sl, seq_lens = _batch([1, 1], [700, 260])
    pat = _patterns("streaming", seq_lens)
    sel, cnt = selection_from_patterns(pat, sl, BS, table.shape[1])
    given = ids(sel)
    ws = SparseDecodeWorkspace.allocate(4, q.shape[1], D, device="cuda")
    out = torch.empty_like(q)
    ops.sparse_decode(q, cache, table, sl, given, cnt, 0.125, out, ws, physical)  # warm-up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sparse_decode(q, cache, table, sl, given, cnt, 0.125, out, ws, physical)
    # new contents, same addresses: replay must see them
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([650, 261], device="cuda", dtype=torch.int32))
    sel2, cnt2 = selection_from_patterns(pat, sl, BS, table.shape[1])
    given.copy_(ids(sel2))
    cnt.copy_(cnt2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = sparse_paged_decode_ref(q, cache, table, sl, sel2, cnt2, 0.125)  # whole selected blocks
    assert torch.isfinite(out).all() and (out.float() - ref).norm() / ref.norm() < 1e-2


def test_ops_under_torch_compile_fullgraph():
    import casakv_vllm.ops as ops

    q, cache, table, qsl, sl, seq_lens = _batch([5, 64], [40, 0])
    pat = _patterns("streaming", seq_lens)

    def layer(x, out):
        y = x * 2.0  # ordinary ops around the opaque attention op
        ops.sparse_attention(y, cache, table, qsl, sl, 0.125, out, pat, 64, max(seq_lens))
        return out + 1.0

    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, torch.empty_like(q))
    ref = _reference(q * 2.0, cache, table, qsl, sl, pat, 0.125) + 1.0
    assert (got.float() - ref).norm() / ref.norm() < 1e-2


def test_sparse_attention_op_plans_wide_tiles_on_promise(monkeypatch):
    """The op passes PatternBatch.sparse_only through to the tile plan: a
    sparse-only batch in WIDE_SEQ at head size 128 gets WIDE_TILES, the same
    batch without the promise the table's tiles, and both are exact."""
    import casakv_vllm.ops as ops
    from casakv_vllm.triton_kernels import sparse_prefill
    from casakv_vllm.triton_kernels.patterns import PatternBatch
    from casakv_vllm.triton_kernels.sparse_reference import sparse_paged_attention_ref

    planned = []
    real = sparse_prefill.plan_blocks

    def spy(*args, **kwargs):
        planned.append(real(*args, **kwargs))
        return planned[-1]

    monkeypatch.setattr(sparse_prefill, "plan_blocks", spy)
    g = torch.Generator(device="cuda").manual_seed(4)
    hkv, group, d, bs = 2, 4, 128, 16
    n = sparse_prefill.WIDE_SEQ[0] + 200
    nb = -(-n // bs)
    cache = torch.randn(nb + 1, hkv, bs, 2 * d, device="cuda", generator=g).to(torch.bfloat16)
    table = (torch.randperm(nb, device="cuda", generator=g) + 1).to(torch.int32)[None]
    q_len = 300
    q = torch.randn(q_len, hkv * group, d, device="cuda", generator=g).to(torch.bfloat16)
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    sl = torch.tensor([n], dtype=torch.int32, device="cuda")
    pat = PatternBatch.local(1, hkv, 64, 700, device="cuda")
    ref = sparse_paged_attention_ref(q, cache, table, qsl, sl, 0.125, pat)[0]
    for promise in (True, False):
        pat.sparse_only = promise
        out = torch.full_like(q, float("nan"))
        ops.sparse_attention(q, cache, table, qsl, sl, 0.125, out, pat, q_len, n)
        wide = planned[-1] == (sparse_prefill.WIDE_TILES[0] // group, sparse_prefill.WIDE_TILES[1])
        assert wide == promise, planned
        assert (out.float() - ref).norm() / ref.norm() < 1e-2
