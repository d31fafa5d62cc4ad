"""The estimated-prefill benchmark's synthetic attention: its heads have the structure they are meant to have,
which the online estimator finds (the GPU timing itself runs in `casakv bench kernels --sections estimated`)."""

from __future__ import annotations

import torch

from casakv_kernels.patterns import pattern_mask
from casakv_vllm.observe.estimate import PROGRAMS, estimate_patterns
from casakv_vllm.tools.bench.estimated import HEAD_KINDS, structured_qk
from casakv_vllm.tools.bench.gpu_timing import D, HKV, HQ


def test_structured_heads_get_sparse_patterns_that_hold_on_queries_the_estimator_did_not_see():
    n = 4096
    q, k = structured_qk(n, torch.Generator().manual_seed(0), "cpu")
    est = estimate_patterns(q[n - 64:].transpose(0, 1), k, 0, D ** -0.5)
    names = [PROGRAMS[p] for p in est.program.tolist()]
    for name, (local, heavy) in zip(names, HEAD_KINDS):
        if local == heavy == 0:
            assert name == "full"  # no structure: nothing sparse reaches the threshold
        elif heavy == 0:
            assert name in ("a-shape", "slash")
        elif local == 0:
            assert name == "vertical"
        else:
            assert name != "full"
    # held-out rows: earlier queries, which the pattern must serve too
    pos = torch.randint(n // 4, n - 64, (24,), generator=torch.Generator().manual_seed(1))
    group = HQ // HKV
    logits = torch.einsum("hqd,hkd->hqk", q[pos].transpose(0, 1).reshape(HKV, group * len(pos), D), k)
    logits = logits.view(HKV, group, len(pos), n) * D ** -0.5
    causal = torch.arange(n).view(1, n) <= pos.view(-1, 1)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).mean(1)
    recall = (probs * pattern_mask(est.patterns, 0, pos, n)).sum(-1).mean(1)
    assert float(recall.min()) > 0.85, recall
    assert float(est.density[est.program != PROGRAMS.index("full")].max()) < 0.25
