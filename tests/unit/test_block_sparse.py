"""Block-sparse prefill attention in torch: the pattern's exact output, computing only touched key blocks."""

import pytest
import torch

from casakv_kernels.patterns import PatternBatch, pattern_mask
from casakv_vllm.ops.block_sparse import pattern_attention


def _reference(q, k, v, context, scale, patterns):
    h, n, _ = q.shape
    hkv = k.shape[0]
    allowed = pattern_mask(patterns, 0, torch.arange(context, context + n), k.shape[1])  # [Hkv, n, S]
    g = h // hkv
    logits = torch.einsum("hnd,hsd->hns", q.float(), k.float().repeat_interleave(g, 0)) * scale
    logits = logits.masked_fill(~allowed.repeat_interleave(g, 0), float("-inf"))
    return torch.softmax(logits, -1) @ v.float().repeat_interleave(g, 0)


def _patterns(kind, hkv, seq, g):
    p = PatternBatch.empty(1, hkv, num_slash=4, num_vertical=8)
    if kind == "a-shape":
        p.sink.fill_(16)
        p.window.fill_(100)
    elif kind == "vertical-slash":
        p.vertical[0] = torch.randint(0, seq, (hkv, 8), generator=g, dtype=torch.int32)
        p.slash[0] = torch.randint(0, 300, (hkv, 4), generator=g, dtype=torch.int32)
    elif kind == "mixed":  # one head each: full, a-shape, verticals
        p.full[0, 0] = True
        p.sink[0, 1], p.window[0, 1] = 4, 64
        p.vertical[0, 2] = torch.randint(0, seq, (8,), generator=g, dtype=torch.int32)
    elif kind == "blocks":
        p.block = 64
        nb = -(-seq // 64)
        p.blocks = torch.rand(1, hkv, nb, nb, generator=g) < 0.2
    return p


@pytest.mark.parametrize("kind", ["a-shape", "vertical-slash", "mixed", "blocks"])
@pytest.mark.parametrize("context,q_len", [(0, 200), (700, 300)])
def test_pattern_attention_matches_the_masked_reference(kind, context, q_len):
    g = torch.Generator().manual_seed(len(kind) + context)
    hkv, group, d = 3, 2, 32
    seq = context + q_len
    q = torch.randn(hkv * group, q_len, d, generator=g)
    k = torch.randn(hkv, seq, d, generator=g)
    v = torch.randn(hkv, seq, d, generator=g)
    p = _patterns(kind, hkv, seq, g)
    out, computed = pattern_attention(q, k, v, context, 0.2, p, block=64)
    torch.testing.assert_close(out, _reference(q, k, v, context, 0.2, p), atol=1e-5, rtol=1e-5)
    causal = hkv * sum(range(context + 1, seq + 1))
    if kind in ("a-shape", "vertical-slash") and context:
        assert computed < 0.7 * causal, (computed, causal)  # skipped blocks are not computed
