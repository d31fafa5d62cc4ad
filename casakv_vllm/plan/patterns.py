"""The patterns of a whole batch: each row's policy's patterns, dense rows as full heads."""

from __future__ import annotations

import torch

from casakv_kernels.patterns import PatternBatch
from casakv_vllm.plan.batch import BatchPlan


def batch_patterns(plan: BatchPlan, layer: int, num_kv_heads: int, device: torch.device) -> PatternBatch:
    """One ``PatternBatch`` of every row of ``plan`` at ``layer`` (row ``i`` = batch row ``i``).

    Rows of one policy get their patterns in one call (``Policy.patterns``).
    Evicting rows have no static pattern here: they are dense in this batch
    (their keep-sets apply on top, on the paths that serve them), and so are
    sparse prefill rows (their patterns are estimated in the layer).
    """
    return PatternBatch.assemble(pattern_parts(plan, layer, num_kv_heads, device), len(plan.rows), num_kv_heads,
                                 device)


def pattern_parts(plan: BatchPlan, layer: int, num_kv_heads: int, device: torch.device,
                  estimated: bool = False) -> list[tuple[list[int], PatternBatch | None]]:
    """``PatternBatch.assemble``'s parts for ``plan`` at ``layer``; ``estimated``: leave the sparse prefill
    rows out (the layer adds their estimated patterns) instead of making them dense."""
    groups: dict[int, tuple[object, list[int]]] = {}
    dense: list[int] = []
    for r in plan.rows:
        if r.sparse and estimated:
            continue
        if r.dense or r.evicting or r.sparse:
            dense.append(r.index)
        else:
            groups.setdefault(id(r.policy), (r.policy, []))[1].append(r.index)
    seq_lens = [r.seq_len for r in plan.rows]
    parts = [(rows, policy.patterns(layer, [seq_lens[i] for i in rows], num_kv_heads, device))
             for policy, rows in groups.values()]
    if dense:
        parts.append((dense, None))
    return parts


def pattern_layers(plan: BatchPlan) -> list[int | None]:
    """Layers that need patterns of their own (``[None]``: one set serves every layer)."""
    pattern_rows = [r for r in plan.rows if not r.dense and not r.evicting and not r.sparse]
    if not pattern_rows:
        return []
    if any(r.policy.caps.layer_dependent for r in pattern_rows):
        return list(range(plan.num_layers))
    return [None]
