"""Data-dependent eviction policies (SnapKV, H2O, ...): the shared machinery.

A :class:`KeepPolicy` reads the whole prompt during prefill, exactly like full
attention.  When a request starts decoding, ``select`` picks, per layer and KV
head, which prompt tokens the cache keeps; from then on attention reads only
those plus the generated tokens (``on_decode`` may evict more as it goes, as
H2O does).  Until the block-manager work lands this acts by masking, which
for quality is the same as evicting: an evicted token is never read again.

The keep-set is per request and layer, a ``[num_kv_heads, prompt_len]`` bool,
kept in the request's :class:`~casakv_vllm.requests.RequestSlot`.  Its
inputs are the prompt's observations (:mod:`casakv_vllm.observations`).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch

from casakv_vllm.observations import LayerObservation, attention_probs, group_sum
from casakv_vllm.policies.base import Policy

logger = logging.getLogger("casakv_vllm")


class KeepPolicy(Policy):
    """Base of eviction policies; subclasses implement :meth:`select`.

    Class attributes:
        needs_col_sums: ``select`` wants every prompt query's attention mass
            (costs one extra attention pass during prefill).
        observes_decode: ``on_decode`` wants the decode query's probabilities.
    """

    needs_col_sums: ClassVar[bool] = False
    observes_decode: ClassVar[bool] = False
    changes_prefill = False
    evicts = True
    num_layers: int | None = None  # set by the resolver (model depth)

    def patterns(self, layer, seq_lens, num_kv_heads, device):
        return None  # no static structure: prefill is full attention

    @classmethod
    def validate_config(cls, params, config) -> None:
        if config.kv_budget is None and config.kv_ratio is None:
            raise ValueError(f"{cls.name} needs kv_budget or kv_ratio")

    def prompt_budget(self, layer: int, prompt_len: int) -> int:
        """Prompt tokens kept per KV head of ``layer`` (before generation)."""
        cfg = self.config
        if cfg.kv_budget is not None:
            return min(prompt_len, cfg.kv_budget)
        if cfg.kv_ratio is not None:
            return min(prompt_len, max(1, math.ceil(cfg.kv_ratio * prompt_len)))
        return prompt_len

    def select(self, layer: int, prompt_len: int, k: torch.Tensor, obs: LayerObservation | None,
               scale: float) -> torch.Tensor:
        """Keep-set of the prompt: ``[num_kv_heads, prompt_len]`` bool.

        Args:
            k: ``[num_kv_heads, prompt_len, D]`` prompt keys (post-RoPE).
            obs: the prompt's observations at this layer (None if unknown).
        """
        raise NotImplementedError

    def start(self, layer: int, state: dict, prompt_len: int, k: torch.Tensor, obs: LayerObservation | None,
              scale: float) -> torch.Tensor:
        """First decode step of a request at ``layer``: its prompt keep-set (may seed ``state``)."""
        return self.select(layer, prompt_len, k, obs, scale)

    def on_decode(self, layer: int, state: dict, keep: torch.Tensor, probs: torch.Tensor | None) -> None:
        """After one decode step; ``keep`` is the ``[num_kv_heads, cap]`` keep-set (editable)."""

    def visible(self, layer: int, state: dict, prompt_len: int, seq_len: int, k: torch.Tensor,
                obs: LayerObservation | None, scale: float) -> torch.Tensor:
        """KV positions a decode query at ``seq_len - 1`` reads: ``[num_kv_heads, seq_len]`` bool."""
        keep = state.get(layer)
        if keep is None:
            keep = torch.ones(k.shape[0], max(seq_len, prompt_len) + 64, dtype=torch.bool)
            keep[:, :prompt_len] = self.start(layer, state, prompt_len, k[:, :prompt_len], obs, scale)
            state[layer] = keep
        if keep.shape[1] < seq_len:  # grow the generated part
            grown = torch.ones(keep.shape[0], 2 * seq_len, dtype=torch.bool)
            grown[:, : keep.shape[1]] = keep
            keep = state[layer] = grown
        self.before_decode(layer, state, keep, prompt_len, seq_len)
        return keep[:, :seq_len]

    def before_decode(self, layer: int, state: dict, keep: torch.Tensor, prompt_len: int, seq_len: int) -> None:
        """Hook to evict before the step reads the cache (H2O)."""


# --- helpers shared by the selection rules ---------------------------------------------------------


def window_scores(obs: LayerObservation | None, k: torch.Tensor, window: int, scale: float) -> torch.Tensor | None:
    """Attention mass each prompt key gets from the last ``window`` prompt queries.

    Returns ``[num_kv_heads, prompt_len]`` fp32 (summed over the window's
    queries and each group's query heads), or None without observations.
    """
    if obs is None or not bool(obs.window_seen.any()):
        return None
    num_kv, plen, _ = k.shape
    w_all = obs.window_q.shape[1]
    rows = torch.arange(w_all)[-min(window, w_all):]
    rows = rows[obs.window_seen[rows]]
    if rows.numel() == 0:
        return None
    first = plen - w_all
    probs = attention_probs(obs.window_q[:, rows], k, first + rows, scale)
    return group_sum(probs, num_kv).sum(1)


def recency_keep(num_kv: int, prompt_len: int, budget: int, sink: int = 4) -> torch.Tensor:
    """Fallback keep-set without observations: ``sink`` first tokens + the most recent ones."""
    keep = torch.zeros(num_kv, prompt_len, dtype=torch.bool)
    sink = min(sink, budget // 2)
    keep[:, :sink] = True
    if budget - sink > 0:
        keep[:, prompt_len - (budget - sink):] = True
    return keep


def topk_keep(scores: torch.Tensor, budget: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row top-``budget`` of ``scores`` (``[H, L]``); ``protect`` positions are kept first."""
    num_kv, length = scores.shape
    keep = torch.zeros(num_kv, length, dtype=torch.bool)
    if budget >= length:
        keep[:] = True
        return keep
    s = scores.clone().float()
    if protect is not None:
        s[protect] = float("inf")
    idx = torch.topk(s, budget, dim=1).indices
    keep.scatter_(1, idx, True)
    return keep


def warn_once(policy: str, what: str) -> None:
    key = (policy, what)
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("casakv policy %s: %s", policy, what)


_WARNED: set[tuple[str, str]] = set()
