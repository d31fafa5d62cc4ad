"""One selection for every evicting policy: scores and budgets -> a keep-set, on the scores' device.

No host synchronisation: budgets are host ints, or a device tensor together
with a host upper bound.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("casakv_vllm")
_WARNED: set[tuple[str, str]] = set()
#: rank of a must-stay (+inf) token at position 0 (fp32 holds MUST_STAY + every position exactly)
MUST_STAY = 2.0 ** 23


def select_top(scores: torch.Tensor, budget: int | torch.Tensor, protect: torch.Tensor | None = None,
               max_budget: int | None = None) -> torch.Tensor:
    """Per-head top-``budget`` of ``scores``; ``protect`` positions are taken first.

    Args:
        scores: ``[Hkv, L]`` (higher = keep; ``+inf`` = always keep).
        budget: tokens kept per head: an int, or ``[Hkv]`` int64 on the
            scores' device with ``max_budget`` >= every entry (host int).
        protect: optional ``[Hkv, L]`` bool, kept before anything else.
    Returns:
        ``[Hkv, L]`` bool keep-set.
    """
    num_kv, length = scores.shape
    keep = torch.zeros(num_kv, length, dtype=torch.bool, device=scores.device)
    s = scores.float()
    if protect is not None:
        s = s.masked_fill(protect, float("inf"))
    # tokens that must stay rank above every score, the latest first: when a budget is smaller than
    # what must stay (a short prompt under SnapKV's window), the most recent of them are kept
    s = torch.where(torch.isposinf(s), MUST_STAY + torch.arange(length, device=s.device, dtype=s.dtype), s)
    if isinstance(budget, int):
        if budget >= length:
            keep[:] = True
        elif budget > 0:
            keep.scatter_(1, torch.topk(s, budget, dim=1).indices, True)
        return keep
    kmax = min(length, int(max_budget if max_budget is not None else length))
    if kmax <= 0:
        return keep
    idx = torch.topk(s, kmax, dim=1).indices  # sorted, best first
    take = torch.arange(kmax, device=scores.device).unsqueeze(0) < budget.unsqueeze(1)
    keep.scatter_(1, idx, take)
    return keep


def recency_keep(num_kv: int, prompt_len: int, budget: int, sink: int = 4, device=None) -> torch.Tensor:
    """Fallback keep-set without observations: ``sink`` first tokens + the most recent ones."""
    keep = torch.zeros(num_kv, prompt_len, dtype=torch.bool, device=device)
    sink = min(sink, budget // 2)
    keep[:, :sink] = True
    if budget - sink > 0:
        keep[:, prompt_len - (budget - sink):] = True
    return keep


def warn_once(policy: str, what: str) -> None:
    """Log ``what`` once per (policy, message) and process."""
    key = (policy, what)
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("casakv policy %s: %s", policy, what)
