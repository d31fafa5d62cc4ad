"""Shared helpers of the unit tests: prompts with recorded observations."""

import pytest
import torch

from casakv_vllm.observe.record import plan_record, record_layer
from casakv_vllm.observe.store import PromptObservations

H, HKV, D = 6, 2, 16
SCALE = D ** -0.5


def observe(plen, seed=0, chunks=(1.0,), col_sums=False, planted=None):
    """Random q/k of a prompt, recorded chunk by chunk as prefill rows would record them.

    ``planted`` keys get every query's attention.  Returns ``(q [H, L, D], k [Hkv, L, D], obs)``.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, plen, D, generator=g)
    k = torch.randn(HKV, plen, D, generator=g)
    if planted is not None:
        u = torch.randn(D, generator=g)
        u = u / u.norm()
        q += 4 * u
        k[:, planted] = 5 * u
    obs = PromptObservations(plen)
    start = 0
    for frac in chunks:
        end = round(frac * plen)
        job = plan_record(obs, 0, 0, start, end - start, col_sums)
        if job is not None:
            record_layer(job, 0, q[:, start:end].transpose(0, 1), SCALE, lambda end=end: k[:, :end])
        start = end
    return q, k, obs


@pytest.fixture
def observed():
    """``observe(plen, seed=0, chunks=(1.0,), col_sums=False, planted=None)`` -> (q, k, obs);
    shapes: H=6 query heads, 2 KV heads, D=16, scale D**-0.5."""
    return observe
