"""The CUDA split stage of the sparse paged decode (csrc/sparse_decode.cu,
``sparse_paged_decode(..., impl="cuda")``) against the fp32 reference and
the Triton split stage.  GPU tests need the built extension; the
bad-input tests run everywhere."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casakv_vllm.triton_kernels.cuda_ops import cuda_op
from casakv_vllm.triton_kernels.sparse_decode import (
    SparseDecodeWorkspace,
    cuda_split_unsupported,
    physical_selection,
    sparse_paged_decode,
)
from casakv_vllm.triton_kernels.sparse_decode_reference import sparse_paged_decode_ref

from decode_cases import SEL_KINDS, _check, _make_case, _run

HAS_OP = torch.cuda.is_available() and cuda_op("sparse_decode_split") is not None


def _physical(case):
    return dict(case, sel_blocks=physical_selection(case["sel_blocks"], case["block_table"]))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_OP, reason="needs CUDA and casakv_vllm._C")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("num_splits,stages", [(1, 2), (3, 3), (None, 5)])
def test_cuda_split_matches_reference(d, group, dtype, bs, num_splits, stages):
    seed = d * 7 + group * 13 + bs + stages
    # partial last blocks, a single-token sequence, a long one; unselected and
    # unowned slots (and every slot past seq_len) are NaN
    case = _make_case([1, 37, 16 * 9 + 5, 700], 2, group, d, bs, dtype, "contiguous",
                      SEL_KINDS, seed)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    out, lse = _run(case, num_splits=num_splits, physical=True, impl="cuda",
                    num_stages=stages, out_rows_pad=1)
    _check(out, ref, dtype, lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_OP, reason="needs CUDA and casakv_vllm._C")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_lens=st.lists(st.integers(1, 600), min_size=1, max_size=4),
    hkv=st.integers(1, 3),
    group=st.integers(1, 8),
    d=st.sampled_from([64, 128]),
    bs=st.sampled_from([16, 32, 64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    kinds=st.lists(st.sampled_from(SEL_KINDS + ["empty"]), min_size=1, max_size=4),
    num_splits=st.sampled_from([None, 1, 2, 5, 17]),
    stages=st.integers(2, 6),
    with_lse=st.booleans(),
    fused=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cuda_split_random(seq_lens, hkv, group, d, bs, dtype, kinds, num_splits, stages,
                           with_lse, fused, seed):
    """Random shapes, block tables, lengths, selections (empty rows too):
    the CUDA split stage matches the fp32 reference and the Triton stage."""
    case = _make_case(seq_lens, hkv, group, d, bs, dtype, "contiguous", kinds, seed)
    ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
    out, lse = _run(case, num_splits=num_splits, physical=True, impl="cuda",
                    num_stages=stages, with_lse=with_lse, fused_merge=fused)
    tri, tri_lse = _run(case, num_splits=num_splits, physical=True, impl="triton",
                        with_lse=with_lse)
    empty = (case["sel_count"] == 0).repeat_interleave(group, dim=1)
    assert (out.float()[empty] == 0).all()
    if with_lse:
        assert torch.isneginf(lse[empty]).all()
        _check(out, ref, dtype, lse, ref_lse)
    else:
        _check(out, ref, dtype)
    torch.testing.assert_close(out.float(), tri.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_OP, reason="needs CUDA and casakv_vllm._C")
def test_auto_picks_cuda_and_falls_back():
    """impl='auto' gives the CUDA result where it applies (physical ids) and
    the Triton one elsewhere (logical ids, fp32, padded pages)."""
    case = _make_case([300, 45], 2, 4, 128, 16, torch.bfloat16, "contiguous", SEL_KINDS, 5)
    ref = sparse_paged_decode_ref(**case)
    auto, _ = _run(case, num_splits=4, physical=True)
    cuda, _ = _run(case, num_splits=4, physical=True, impl="cuda")
    assert torch.equal(auto, cuda)
    _check(auto, ref, torch.bfloat16)
    for c, phys in ((case, False),
                    (_make_case([300, 45], 2, 4, 128, 16, torch.float32, "contiguous", SEL_KINDS, 5), True),
                    (_make_case([300, 45], 2, 4, 128, 16, torch.bfloat16, "padded", SEL_KINDS, 5), True)):
        got, _ = _run(c, num_splits=4, physical=phys)
        _check(got, sparse_paged_decode_ref(**c), c["query"].dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_OP, reason="needs CUDA and casakv_vllm._C")
@pytest.mark.parametrize("num_splits,fused", [(1, False), (6, False), (6, True), (16, True)])
def test_cuda_split_graph_replay(num_splits, fused):
    """Captured once in a CUDA graph, replayed with new queries, lengths and
    selections (physical ids) written in place; with the fused merge the
    per-(request, KV head) counters must be back at zero after every call."""
    R, hkv, group, d, bs, max_len = 3, 2, 4, 128, 16, 900
    case = _physical(_make_case([max_len] * R, hkv, group, d, bs, torch.bfloat16, "contiguous",
                                ["all"], seed=1, poison_unselected=False))
    maxsel = case["sel_blocks"].shape[2]
    q = case["query"]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device="cuda")
    ws = SparseDecodeWorkspace.allocate(R, hkv * group, d, max_splits=16, device="cuda")

    def step():
        sparse_paged_decode(**case, out=out, lse=lse, workspace=ws, num_splits=num_splits,
                            sel_physical=True, impl="cuda", fused_merge=fused)

    step()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(2)
    table = case["block_table"].cpu()
    for it in range(3):
        case["query"].copy_(torch.randn(q.shape, generator=gen).to("cuda", q.dtype))
        lens = torch.randint(1, max_len + 1, (R,), generator=gen, dtype=torch.int32)
        case["seq_lens"].copy_(lens.cuda())
        logical = torch.zeros(R, hkv, maxsel, dtype=torch.int32)
        cnt = torch.zeros(R, hkv, dtype=torch.int32)
        for r in range(R):
            n = math.ceil(int(lens[r]) / bs)
            for h in range(hkv):
                m = torch.rand(n, generator=gen) < (0.2 + 0.3 * it)
                m[n - 1] = True
                b = torch.nonzero(m).flatten()
                logical[r, h, :b.numel()] = b.int()
                cnt[r, h] = b.numel()
        case["sel_blocks"].copy_(physical_selection(logical, table).cuda())
        case["sel_count"].copy_(cnt.cuda())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = dict(case, sel_blocks=logical.cuda())
        ref, ref_lse = sparse_paged_decode_ref(**want, return_lse=True)
        _check(out, ref, torch.bfloat16, lse, ref_lse)
        assert (ws.counters == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_OP, reason="needs CUDA and casakv_vllm._C")
def test_cuda_split_op_meta_and_bad_input():
    """The op has a meta implementation (shape checks, no work) and rejects
    bad input with an error naming the problem."""
    op = cuda_op("sparse_decode_split")
    R, H, hkv, d, bs, nb, S = 2, 8, 2, 128, 16, 10, 4
    args = dict(query=torch.empty(R, H, d, dtype=torch.bfloat16),
                kv_cache=torch.empty(nb, hkv, bs, 2 * d, dtype=torch.bfloat16),
                block_table=torch.zeros(R, nb, dtype=torch.int32),
                seq_lens=torch.ones(R, dtype=torch.int32),
                sel=torch.zeros(R, hkv, nb, dtype=torch.int32),
                sel_count=torch.ones(R, hkv, dtype=torch.int32))
    ws = SparseDecodeWorkspace.allocate(R, H, d, S, device="meta")

    def call(device, **over):
        a = {k: v.to(device) for k, v in dict(args, **over).items()}
        out = torch.empty(R, H, d, dtype=a["query"].dtype, device=device)
        op(a["query"], a["kv_cache"], a["block_table"], a["seq_lens"], a["sel"], a["sel_count"],
           1.0, S, 3, 4, out, None, ws.acc.to(device), ws.m.to(device), ws.l.to(device),
           ws.counters.to(device))

    call("meta")
    with pytest.raises(RuntimeError, match="head_size must be 64 or 128"):
        call("meta", query=torch.empty(R, H, 96, dtype=torch.bfloat16),
             kv_cache=torch.empty(nb, hkv, bs, 192, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="block_size must be a multiple of 16"):
        call("meta", kv_cache=torch.empty(nb, hkv, 8, 2 * d, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="int32"):
        call("cuda", sel=torch.zeros(R, hkv, nb, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="page must be contiguous"):
        call("cuda", kv_cache=torch.empty(nb, bs, hkv, 2 * d, dtype=torch.bfloat16).permute(0, 2, 1, 3))


@pytest.mark.parametrize("why,make", [
    ("sel_physical", lambda c: dict(c, sel_physical=False)),
    ("dtype", lambda c: dict(c, query=c["query"].float(), kv_cache=c["kv_cache"].float(),
                             out=c["out"].float())),
    ("head_size", None),
])
def test_impl_cuda_refuses_unsupported_calls(why, make):
    """impl='cuda' on a call the CUDA stage cannot take raises ValueError with
    the reason (on a CPU machine: always, tensors are not on CUDA);
    impl='auto' runs the Triton stage instead."""
    d = 32 if why == "head_size" else 64
    case = _make_case([40, 17], 2, 2, d, 16, torch.bfloat16, "contiguous", SEL_KINDS, 9)
    call = dict(_physical(case), out=torch.empty_like(case["query"]), sel_physical=True)
    if make is not None:
        call = make(call)
    reason = cuda_split_unsupported(call["query"], call["kv_cache"], call["out"], call["sel_physical"])
    assert reason is not None
    with pytest.raises(ValueError, match="impl='cuda' cannot run this call"):
        sparse_paged_decode(**call, impl="cuda")
    with pytest.raises(ValueError, match="impl must be"):
        sparse_paged_decode(**call, impl="cutlass")
