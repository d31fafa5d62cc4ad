"""Shared by the sparse-decode tests: random paged decode batches with
poisoned (NaN) cache slots, and the run / compare helpers."""

import math

import torch

from casakv_vllm.triton_kernels.sparse_decode import physical_selection, sparse_paged_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "block_major", "padded"]
SEL_KINDS = ["all", "single", "last", "random", "first_last"]


def _cache(num_blocks, hkv, bs, d, dtype, layout, gen):
    """Random cache, logical [nb, hkv, bs, 2d], physical layout kept (the
    dtype/device conversion happens before the view is taken)."""
    def phys(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if layout == "contiguous":
        c = phys(num_blocks, hkv, bs, 2 * d)
    elif layout == "block_major":
        c = phys(num_blocks, bs, hkv, 2 * d).permute(0, 2, 1, 3)
    elif layout == "padded":
        c = phys(num_blocks, hkv, bs, 2 * d + 8)[..., :2 * d]
    else:
        raise ValueError(layout)
    return c


def _make_case(seq_lens, hkv, group, d, bs, dtype, layout, sel_kinds, seed,
               strided_query=False, poison_unselected=True):
    """Random paged decode batch plus a selection per (request, kv head).

    Cache slots no request owns are NaN; with ``poison_unselected`` so are
    the slots of a head's blocks it did not select (a stray read -> NaN)."""
    gen = torch.Generator().manual_seed(seed)
    R = len(seq_lens)
    nblk = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(nblk) + 2  # block 0 unused
    cache = _cache(num_blocks, hkv, bs, d, dtype, layout, gen)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(nblk) + 2
    block_table = torch.randint(0, num_blocks, (R, width), generator=gen, dtype=torch.int32)
    maxsel = max(nblk) + 1
    sel = torch.randint(0, max(nblk), (R, hkv, maxsel), generator=gen, dtype=torch.int32)
    cnt = torch.zeros(R, hkv, dtype=torch.int32)
    keep_slot = torch.zeros(num_blocks, hkv, bs, dtype=torch.bool)
    for r in range(R):
        ids = perm[:nblk[r]]
        perm = perm[nblk[r]:]
        block_table[r, :nblk[r]] = torch.tensor(ids, dtype=torch.int32)
        for h in range(hkv):
            kind = sel_kinds[(r * hkv + h) % len(sel_kinds)]
            n = nblk[r]
            if kind == "all":
                blocks = list(range(n))
            elif kind == "single":
                blocks = [int(torch.randint(0, n, (1,), generator=gen))]
            elif kind == "last":
                blocks = [n - 1]
            elif kind == "first_last":
                blocks = sorted({0, n - 1})
            elif kind == "random":
                m = torch.rand(n, generator=gen) < 0.5
                m[n - 1] = True
                blocks = torch.nonzero(m).flatten().tolist()
            elif kind == "empty":
                blocks = []
            else:
                raise ValueError(kind)
            cnt[r, h] = len(blocks)
            sel[r, h, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            for b in (blocks if poison_unselected else range(n)):
                valid = min(bs, seq_lens[r] - b * bs)
                keep_slot[ids[b], h, :valid] = True
    cache.masked_fill_(~keep_slot.to(DEVICE)[..., None], float("nan"))
    num_heads = hkv * group
    if strided_query:
        buf = torch.randn(R, num_heads + 2, d + 8, generator=gen)
        query = buf.to(DEVICE, dtype)[:, 1:num_heads + 1, 4:d + 4]
    else:
        query = torch.randn(R, num_heads, d, generator=gen).to(DEVICE, dtype)
    return dict(
        query=query, kv_cache=cache, block_table=block_table.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        sel_blocks=sel.to(DEVICE), sel_count=cnt.to(DEVICE), scale=d ** -0.5,
    )


def _check(got, want, dtype, got_lse=None, want_lse=None):
    got = got.float()
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        rel = (got - want).norm() / want.norm().clamp(min=1e-6)
        assert rel <= 1e-2, f"relative error {rel:.3e}"
    if got_lse is not None:
        torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)


def _run(case, num_splits=None, with_lse=True, workspace=None, out_rows_pad=0,
         physical=False, **kw):
    q = case["query"]
    R, H, D = q.shape
    out = torch.full((R + out_rows_pad, H, D), float("nan"), dtype=q.dtype, device=DEVICE)
    lse = (torch.full((R + out_rows_pad, H), float("nan"), device=DEVICE)
           if with_lse else None)
    if physical:  # the same selection, as physical block ids
        case = dict(case, sel_blocks=physical_selection(case["sel_blocks"], case["block_table"]))
    res = sparse_paged_decode(**case, out=out, lse=lse, workspace=workspace,
                              num_splits=num_splits, sel_physical=physical, **kw)
    assert res is out
    if out_rows_pad:
        assert torch.isnan(out[R:]).all()
        assert lse is None or torch.isnan(lse[R:]).all()
    return out[:R], (lse[:R] if lse is not None else None)
