"""KV compaction (Triton kernel and, on GPU, the CUDA op) vs. the reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from casakv_kernels.compaction import (  # noqa: E402
    allocate_scratch,
    compact_kv,
    compact_kv_triton,
)
from casakv_kernels.compaction_reference import compact_kv_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "block_major", "dim_major", "padded", "padded_odd"]
KEEP_KINDS = ["random", "identity_prefix", "all", "none", "shift_one", "single_last",
              "sink_window"]


def _cache(num_blocks, hkv, bs, d, dtype, layout, gen):
    """Random cache, logical [nb, hkv, bs, 2d], with the given physical
    layout (converted to dtype/device before the view is taken)."""
    two_d = 2 * d

    def phys(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if layout == "contiguous":
        c = phys(num_blocks, hkv, bs, two_d)
    elif layout == "block_major":
        c = phys(num_blocks, bs, hkv, two_d).permute(0, 2, 1, 3)
    elif layout == "dim_major":  # stride_d != 1
        c = phys(two_d, num_blocks, bs, hkv).permute(1, 3, 2, 0)
    elif layout == "padded":  # rows 16-byte aligned for every dtype here
        c = phys(num_blocks, hkv, bs, two_d + 8)[..., :two_d]
    elif layout == "padded_odd":  # odd row pitch: no wide vectors possible
        c = phys(num_blocks, hkv, bs, two_d + 1)[..., :two_d]
    else:
        raise ValueError(layout)
    assert c.shape == (num_blocks, hkv, bs, two_d)
    return c


def _keep_row(kind, seq_len, gen):
    if kind == "random":
        m = torch.rand(seq_len, generator=gen) < 0.4
        return torch.nonzero(m).flatten().tolist()
    if kind == "identity_prefix":  # first tokens stay, later ones move
        n = int(torch.randint(0, seq_len + 1, (1,), generator=gen))
        rest = [p for p in range(n + 1, seq_len) if torch.rand(1, generator=gen) < 0.5]
        return list(range(n)) + rest
    if kind == "all":
        return list(range(seq_len))
    if kind == "none":
        return []
    if kind == "shift_one":  # 1 -> 0, 2 -> 1, ...: maximal overlap
        return list(range(1, seq_len))
    if kind == "single_last":
        return [seq_len - 1]
    if kind == "sink_window":
        w = max(1, seq_len // 3)
        return sorted(set(range(min(2, seq_len))) | set(range(seq_len - w, seq_len)))
    raise ValueError(kind)


def _make_case(seq_lens, hkv, d, bs, dtype, layout, kinds, seed, maxk_extra=2):
    gen = torch.Generator().manual_seed(seed)
    R = len(seq_lens)
    nblk = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(nblk) + 2
    cache = _cache(num_blocks, hkv, bs, d, dtype, layout, gen)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.randint(0, num_blocks, (R, max(nblk) + 2), generator=gen,
                                dtype=torch.int32)
    owned = torch.zeros(num_blocks, bs, dtype=torch.bool)
    maxk = max(seq_lens) + maxk_extra
    # entries past keep_count are garbage positions: reading one corrupts
    # a slot that must stay untouched.
    keep = torch.randint(0, min(seq_lens), (R, hkv, maxk), generator=gen, dtype=torch.int32)
    keep_count = torch.zeros(R, hkv, dtype=torch.int32)
    for r in range(R):
        ids = perm[:nblk[r]]
        perm = perm[nblk[r]:]
        block_table[r, :nblk[r]] = torch.tensor(ids, dtype=torch.int32)
        for j, b in enumerate(ids):
            owned[b, :min(bs, seq_lens[r] - j * bs)] = True
        for h in range(hkv):
            row = _keep_row(kinds[(r * hkv + h) % len(kinds)], seq_lens[r], gen)
            keep_count[r, h] = len(row)
            if row:
                keep[r, h, :len(row)] = torch.tensor(row, dtype=torch.int32)
    cache.masked_fill_(~owned.to(DEVICE)[:, None, :, None], float("nan"))
    return dict(kv_cache=cache, block_table=block_table.to(DEVICE), keep=keep.to(DEVICE),
                keep_count=keep_count.to(DEVICE))


def _bits(t):
    """Bit pattern view (NaN-safe exact comparison)."""
    ity = {4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.contiguous().view(ity)


def _check(case, before, after):
    """Moved tokens exact; every other slot bit-identical to ``before``."""
    bs = before.shape[2]
    before = before.cpu()
    expect = before.clone()
    bt = case["block_table"].cpu().long()
    keep = case["keep"].cpu().long()
    cnt = case["keep_count"].cpu()
    changed = torch.zeros(before.shape[:3], dtype=torch.bool)
    for r in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            n = int(cnt[r, h])
            for j in range(n):
                s = int(keep[r, h, j])
                expect[bt[r, j // bs], h, j % bs] = before[bt[r, s // bs], h, s % bs]
                changed[bt[r, j // bs], h, j % bs] = True
    after = after.cpu()
    assert torch.equal(_bits(after[changed]), _bits(expect[changed])), "moved tokens differ"
    assert torch.equal(_bits(after[~changed]), _bits(expect[~changed])), \
        "untouched slots changed"
    assert torch.isfinite(after[changed].float()).all()


def _run_and_check(case, fn):
    before = case["kv_cache"].clone()
    ref = compact_kv_ref(case["kv_cache"].clone(), case["block_table"], case["keep"],
                         case["keep_count"])
    res = fn(**case)
    assert res is None or res is case["kv_cache"]
    _check(case, before, case["kv_cache"])
    assert torch.equal(_bits(case["kv_cache"].cpu()), _bits(ref.cpu()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    hkv=st.integers(1, 2),
    d=st.sampled_from([16, 32, 64]),
    bs=st.sampled_from([4, 5, 16]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    kinds=st.lists(st.sampled_from(KEEP_KINDS), min_size=1, max_size=4),
    with_scratch=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compaction_matches_reference(seq_lens, hkv, d, bs, dtype, layout, kinds,
                                      with_scratch, seed):
    case = _make_case(seq_lens, hkv, d, bs, dtype, layout, kinds, seed)
    # compact_kv dispatches to the CUDA op where built; test Triton too.
    fn = compact_kv_triton if seed % 2 else compact_kv
    if with_scratch:
        scratch = allocate_scratch(case["kv_cache"], case["keep"]).fill_(float("nan"))
        _run_and_check(case, lambda **c: fn(**c, scratch=scratch))
    else:
        _run_and_check(case, fn)


def test_compaction_overlap_example():
    """keep = [1, 2]: 1 -> 0 and 2 -> 1 within one block (the naive race)."""
    case = _make_case([6], 1, 16, 4, torch.float32, "contiguous", ["all"], seed=0)
    case["keep"][0, 0, :2] = torch.tensor([1, 2], dtype=torch.int32)
    case["keep_count"][0, 0] = 2
    _run_and_check(case, compact_kv_triton)


def test_compaction_other_requests_and_heads_untouched():
    case = _make_case([30, 41], 2, 32, 5, torch.bfloat16, "block_major",
                      ["shift_one", "none", "none", "random"], seed=4)
    before = case["kv_cache"].clone()
    compact_kv(**case)
    _check(case, before, case["kv_cache"])
    # request 0 head 1 and request 1 head 0 kept nothing: their slots unchanged
    bt = case["block_table"].cpu()
    for r, h in [(0, 1), (1, 0)]:
        blocks = bt[r, :math.ceil([30, 41][r] / 5)].long()
        assert torch.equal(_bits(case["kv_cache"][blocks, h].cpu()),
                           _bits(before[blocks, h].cpu()))


# ---------------------------------------------------------------------------
# GPU only: the CUDA C++ op
# ---------------------------------------------------------------------------


def _cuda_op_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        import casakv_vllm._C  # noqa: F401
    except ImportError:
        pytest.skip("casakv_vllm._C not built")
    return torch.ops.casakv.compact_kv


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compaction_cuda_op(layout, dtype):
    op = _cuda_op_or_skip()
    for seed, (bs, d) in enumerate([(16, 128), (5, 32), (4, 64)]):
        case = _make_case([70, 33, 129], 2, d, bs, dtype, layout, KEEP_KINDS, seed)
        scratch = allocate_scratch(case["kv_cache"], case["keep"]).fill_(float("nan"))
        _run_and_check(case, lambda **c: op(**c, scratch=scratch))
        # the dispatcher picks the CUDA op too
        case = _make_case([70, 33, 129], 2, d, bs, dtype, layout, KEEP_KINDS[::-1], seed)
        _run_and_check(case, compact_kv)


@pytest.mark.gpu
def test_compaction_cuda_op_meta_and_graph():
    op = _cuda_op_or_skip()
    case = _make_case([50, 20], 2, 64, 16, torch.bfloat16, "contiguous",
                      ["random", "shift_one"], seed=7)
    meta = {k: v.to("meta") for k, v in case.items()}
    op(**meta, scratch=torch.empty(2, 2, 52, 128, dtype=torch.bfloat16, device="meta"))
    scratch = allocate_scratch(case["kv_cache"], case["keep"])
    before = case["kv_cache"].clone()
    g = torch.cuda.CUDAGraph()
    compact_kv(**case, scratch=scratch)  # warm up
    case["kv_cache"].copy_(before)
    with torch.cuda.graph(g):
        compact_kv(**case, scratch=scratch)
    case["kv_cache"].copy_(before)
    g.replay()
    torch.cuda.synchronize()
    _check(case, before, case["kv_cache"])


@pytest.mark.gpu
def test_compaction_cuda_op_rejects_bad_input():
    """Called directly, the op's own checks are the only guard: each bad
    input raises RuntimeError naming the problem (and the process lives)."""
    op = _cuda_op_or_skip()
    case = _make_case([50, 20], 2, 64, 16, torch.bfloat16, "contiguous",
                      ["random", "shift_one"], seed=7)
    scratch = allocate_scratch(case["kv_cache"], case["keep"])
    bad = [
        (dict(block_table=case["block_table"].long()), "must be int32"),
        (dict(keep=case["keep"][:, :1]), "num_kv_heads mismatch"),
        (dict(keep_count=case["keep_count"][:1]), "keep_count must be"),
        (dict(kv_cache=case["kv_cache"][..., :-1]), "last dim must be even"),
        (dict(scratch=scratch[:1]), "scratch too small"),
        (dict(scratch=scratch.float()), "scratch dtype must match"),
    ]
    for over, msg in bad:
        args = dict(case, scratch=scratch)
        args.update(over)
        with pytest.raises(RuntimeError, match=msg):
            op(**args)
    before = case["kv_cache"].clone()
    op(**case, scratch=scratch)  # the good call still works afterwards
    _check(case, before, case["kv_cache"])
