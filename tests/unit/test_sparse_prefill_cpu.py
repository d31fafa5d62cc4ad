"""CPU sparse prefill (``ops.sparse_prefill``) against masked dense attention under ``pattern_mask``,
on random inputs, and the work it skips."""

from __future__ import annotations

import pytest
import torch

from casakv_kernels.patterns import PatternBatch, pattern_mask
from casakv_vllm.ops.sparse_prefill import TILE, sparse_attend
from casakv_vllm.ops.torch_attention import attend

H, HKV, D = 9, 3, 32


def _random_patterns(seq: int, gen: torch.Generator) -> PatternBatch:
    """Each head a different program: sinks + window; columns + slash lines (no window); sinks + window +
    columns + lines (lines inside the window too, columns inside the sinks too)."""
    p = PatternBatch.empty(1, HKV, num_slash=8, num_vertical=12)
    p.sink[0] = torch.tensor([4, 0, 16], dtype=torch.int32)
    p.window[0] = torch.tensor([100, 0, 40], dtype=torch.int32)
    p.vertical[0, 1] = torch.randint(0, seq, (12,), generator=gen).to(torch.int32)
    p.slash[0, 1, :5] = torch.tensor([0, 3, 7, 64, 300], dtype=torch.int32)
    p.vertical[0, 2, :4] = torch.tensor([2, 20, 21, seq - 3], dtype=torch.int32)
    p.slash[0, 2, :3] = torch.tensor([1, 50, 51], dtype=torch.int32)
    return p


def _inputs(seed: int, context: int, n: int, dtype=torch.float32):
    """``(q, k, v, generator)``: random queries, keys and values of a chunk of ``n`` after ``context``."""
    gen = torch.Generator().manual_seed(seed)
    seq = context + n
    q = torch.randn(H, n, D, generator=gen).to(dtype)
    k, v = (torch.randn(HKV, seq, D, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, gen


@pytest.mark.parametrize("context,n", [(0, 200), (700, 300), (1000, 64), (37, 5), (130, 129)])
def test_sparse_prefill_matches_masked_dense_attention(context, n):
    q, k, v, gen = _inputs(context + n, context, n)
    seq = context + n
    p = _random_patterns(seq, gen)
    out, pairs = sparse_attend(q, k, v, context, 0.2, p)
    allowed = pattern_mask(p, 0, torch.arange(context, seq), seq)
    ref = attend(q, k, v, context, 0.2, allowed)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert pairs >= int(allowed.sum())  # every allowed pair is computed ...
    # ... and little more: each query tile's window edge, the lines and columns each query passes
    edge = HKV * n * (TILE - 1) + n * (12 + 6 + 4 + 3)
    assert pairs <= int(allowed.sum()) + edge


def test_block_heads_go_to_the_block_sparse_path():
    context, n = 400, 200
    seq = context + n
    q, k, v, gen = _inputs(11, context, n)
    p = _random_patterns(seq, gen)
    nb = -(-seq // 64)
    p.blocks = torch.zeros(1, HKV, nb, nb, dtype=torch.bool)
    p.blocks[0, 1] = torch.rand(nb, nb, generator=gen) < 0.3  # head 1: its stripes and lines plus blocks
    out, _ = sparse_attend(q, k, v, context, 0.2, p)
    ref = attend(q, k, v, context, 0.2, pattern_mask(p, 0, torch.arange(context, seq), seq))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_full_heads_and_bf16_inputs_are_served():
    context, n = 300, 100
    seq = context + n
    q, k, v, gen = _inputs(3, context, n, torch.bfloat16)
    p = _random_patterns(seq, gen)
    p.full[0, 0] = True
    out, pairs = sparse_attend(q, k, v, context, 0.2, p)
    ref = attend(q, k, v, context, 0.2, pattern_mask(p, 0, torch.arange(context, seq), seq))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    assert out.dtype == torch.float32


def test_a_long_sequence_computes_a_fraction_of_dense_causal_pairs():
    context, n = 3584, 512
    q, k, v, _ = _inputs(5, context, n)
    p = PatternBatch.local(1, HKV, 64, 256)
    _, pairs = sparse_attend(q, k, v, context, 0.2, p)
    dense = HKV * (n * context + n * (n + 1) // 2)
    assert pairs < 0.12 * dense  # (64 + 256 + 63) keys a query against ~3800 on average
