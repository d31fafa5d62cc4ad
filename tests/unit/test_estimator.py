"""The online pattern estimator: each head's program reaches the recall threshold on the rows it saw
(checked with the kernels' own pattern definition), and structured attention gets the program it calls for."""

import math
import random

import pytest
import torch

from casakv_kernels.patterns import pattern_mask
from casakv_vllm.observe.estimate import (ASHAPE, BLOCK, FULL, PROGRAMS, SLASH, VERTICAL, EstimatorConfig,
                                          estimate_patterns)


def _probs(q, k, scale):
    """Plain reference: ``[Hkv, n, S]`` causal softmax averaged over each group's query heads."""
    h, n, d = q.shape
    hkv, s, _ = k.shape
    pos = torch.arange(s - n, s)
    logits = torch.einsum("hnd,hsd->hns", q.float(), k.float().repeat_interleave(h // hkv, 0)) * scale
    logits = logits.masked_fill(torch.arange(s)[None, None] > pos[None, :, None], float("-inf"))
    return torch.softmax(logits, -1).view(hkv, h // hkv, n, s).mean(1)


def _true_recall(est, probs):
    n, s = probs.shape[1:]
    allowed = pattern_mask(est.patterns, 0, torch.arange(s - n, s), s)  # [Hkv, n, S]
    return (probs * allowed).sum(-1).mean(1)


@pytest.mark.parametrize("seed,seq,context,heads", [(0, 300, 200, (4, 2)), (1, 1000, 700, (8, 2)),
                                                    (2, 777, 0, (6, 3)), (3, 2048, 1900, (4, 4))])
def test_every_head_reaches_the_threshold_on_the_rows_it_saw(seed, seq, context, heads):
    g = torch.Generator().manual_seed(seed)
    h, hkv = heads
    d = 32
    q_all = torch.randn(h, seq - context, d, generator=g) * 2
    k = torch.randn(hkv, seq, d, generator=g) * 2
    cfg = EstimatorConfig(last_q=64, threshold=0.9, max_vertical=256, max_slash=64, block=32)
    q = q_all[:, -64:]
    est = estimate_patterns(q, k, context, d ** -0.5, cfg, q_chunk=q_all)
    probs = _probs(q, k, d ** -0.5)
    true = _true_recall(est, probs)
    for head in range(hkv):
        name = PROGRAMS[int(est.program[head])]
        assert name == "full" or true[head] >= cfg.threshold - 1e-4, (head, name, float(true[head]))
        # the estimate is what the program allows; the pattern also always allows the diagonal
        assert -1e-4 < float(true[head]) - float(est.recall[head]) < 0.02, (head, name)
        assert 0 < float(est.density[head]) <= 1.0


def _sinusoid(positions, d, scale):
    freq = torch.exp(-math.log(1000.0) * torch.arange(d // 2) / (d // 2))
    ang = positions.float()[:, None] * freq[None]
    return torch.cat([ang.sin(), ang.cos()], -1) * scale


def test_structured_attention_gets_its_program():
    """Head 0: queries match keys at nearby positions (local attention) -> a local program (a window or the
    nearest diagonals); head 1: every query
    looks at four 'anchor' columns -> vertical stripes holding those columns; head 2: uniform attention
    over a long context -> full (nothing sparse reaches the threshold)."""
    seq, n, d = 2048, 64, 64
    pos = torch.arange(seq)
    k = torch.zeros(3, seq, d)
    q = torch.zeros(3, n, d)
    k[0] = _sinusoid(pos, d, 3.0)
    q[0] = _sinusoid(pos[-n:], d, 3.0)
    anchors = torch.tensor([5, 300, 1200, 1900])
    k[1, :, 0] = 0.0
    k[1, anchors, 0] = 1.0
    q[1, :, 0] = 40.0
    cfg = EstimatorConfig(threshold=0.9)
    est = estimate_patterns(q, k, seq - 512, 1.0, cfg, q_chunk=torch.cat([torch.zeros(3, 512 - n, d), q], 1))
    p = est.patterns
    if int(est.program[0]) == ASHAPE:
        assert int(p.window[0, 0]) <= 512
    else:
        assert int(est.program[0]) == SLASH and 0 <= int(p.slash[0, 0].max()) < 512
    assert int(est.program[1]) == VERTICAL
    cols = est.patterns.vertical[0, 1]
    assert set(cols[cols >= 0].tolist()) == set(anchors.tolist())
    assert int(est.program[2]) in (FULL, BLOCK) and float(est.density[2]) > 0.5
    assert float(est.density[1]) < 0.01


def test_density_sums_are_closed_forms_of_the_loops_they_replace():
    from casakv_vllm.observe.estimate import _causal_area, _sum_min

    rng = random.Random(3)
    for _ in range(500):
        lo, hi, cap = rng.randint(0, 60), rng.randint(0, 90), rng.randint(0, 100)
        assert _sum_min(lo, hi, cap) == sum(min(x, cap) for x in range(lo, hi + 1))
        ctx = rng.randint(0, 60)
        seq = ctx + rng.randint(0, 60)
        assert _causal_area(ctx, seq) == float(sum(range(ctx + 1, seq + 1)))
