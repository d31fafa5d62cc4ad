"""Scorers: how much each prompt token matters, per KV head (``[Hkv, L]``, higher = keep).

A scorer reads the prompt's keys and observations and returns scores, or
None when it has nothing to go on (then the policy falls back to recency).
``+inf`` marks tokens that must stay (e.g. SnapKV's observation window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from casakv_vllm.observe.store import LayerObservation
from casakv_vllm.ops.probs import attention_probs, group_sum
from casakv_vllm.policies.selection import warn_once


@dataclass
class ScoreInput:
    """What a scorer sees of one layer of one prompt.

    Attributes:
        keys: ``[Hkv, L, D]`` prompt keys (post-RoPE), on the KV device.
        obs: the prompt's observations at this layer (None if unknown).
        budget: tokens per head the policy will keep (scorers that shape
            their picks to the budget read it).
    """

    layer: int
    keys: torch.Tensor
    obs: LayerObservation | None
    scale: float
    budget: int = 0  # tokens per head the policy will keep
    policy: str = "?"  # for warnings


class Scorer:
    """Base of scorers.  ``needs_col_sums``: reads every prompt query's attention mass."""

    needs_col_sums: ClassVar[bool] = False

    def score(self, x: ScoreInput) -> torch.Tensor | None:
        raise NotImplementedError


def window_scores(x: ScoreInput, window: int) -> torch.Tensor | None:
    """Attention mass each prompt key gets from the last ``window`` recorded prompt queries.

    Returns ``[Hkv, L]`` fp32 (summed over the window's queries and each
    group's query heads), or None without observations.  Warns when part of
    the window was never recorded (its rows were computed by a request whose
    observations were dropped, or by another prompt sharing the prefix).
    """
    obs = x.obs
    if obs is None:
        return None
    w_all = len(obs.window_seen)
    want = min(window, w_all)
    rows = obs.seen_rows(want)
    if not rows:
        return None
    if len(rows) < want:
        warn_once(x.policy, f"only {len(rows)} of the last {want} prompt queries were observed; "
                            "scoring with those (prefix-cache hit on a prompt observed by no one?)")
    num_kv, plen, _ = x.keys.shape
    if len(rows) == rows[-1] - rows[0] + 1:  # one run of rows: a slice, no index copied to the device
        probs = attention_probs(obs.window_q[:, rows[0]:rows[-1] + 1], x.keys, plen - w_all + rows[0], x.scale)
    else:
        idx = torch.tensor(rows, device=obs.window_q.device)
        probs = attention_probs(obs.window_q.index_select(1, idx), x.keys, plen - w_all + idx, x.scale)
    return group_sum(probs, num_kv).sum(1)


def pooled(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``[H, L]`` scores along L so neighbours of a hit are kept too.

    A hit's own score breaks the tie with its neighbours (which the pool gave
    the same value), so a budget smaller than the pool keeps the hit itself.
    """
    if kernel <= 1:
        return scores
    p = F.max_pool1d(scores.unsqueeze(0), kernel, stride=1, padding=kernel // 2).squeeze(0)
    return p[:, : scores.shape[1]] + 1e-3 * scores


@dataclass
class WindowVotes(Scorer):
    """SnapKV: pooled votes of the last ``window`` prompt queries; the window itself is kept."""

    window: int = 32
    kernel: int = 7

    def score(self, x: ScoreInput) -> torch.Tensor | None:
        plen = x.keys.shape[1]
        w = min(self.window, plen)
        scores = window_scores(x, w)
        if scores is None:
            return None
        scores = pooled(scores, self.kernel)
        scores[:, plen - w:] = float("inf")
        return scores


@dataclass
class AccumulatedAttention(Scorer):
    """H2O: the attention mass every prompt query gave each key (falls back to the last 64 queries)."""

    needs_col_sums: ClassVar[bool] = True
    fallback_window: int = 64

    def score(self, x: ScoreInput) -> torch.Tensor | None:
        obs, plen = x.obs, x.keys.shape[1]
        if obs is not None and obs.col_sums is not None and obs.col_rows == plen:
            return obs.col_sums.clone()
        warn_once(x.policy, "prompt attention mass not recorded (prefix cache hit?); scoring by the last queries")
        return window_scores(x, self.fallback_window)


def recency_scores(num_kv: int, length: int, sink: int, device=None) -> torch.Tensor:
    """Scores that keep ``sink`` first tokens, then the most recent ones."""
    s = torch.arange(length, device=device, dtype=torch.float32).expand(num_kv, length).clone()
    s[:, :sink] = float("inf")
    return s
