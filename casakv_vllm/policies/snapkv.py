"""SnapKV (Li et al., 2024): keep the prompt tokens the prompt's last queries attend to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.policies.base import register_policy
from casakv_vllm.policies.keep import KeepPolicy, recency_keep, topk_keep, warn_once, window_scores


class SnapKVParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    window: int = Field(32, ge=1, le=64, description="observation window: last prompt queries that vote")
    kernel: int = Field(7, ge=1, le=63, description="max-pool width over key positions (odd)")


def pooled_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``[H, L]`` scores along L so neighbours of a hit are kept too.

    A hit's own score breaks the tie with its neighbours (which the pool gave
    the same value), so a budget smaller than the pool keeps the hit itself.
    """
    if kernel <= 1:
        return scores
    pooled = F.max_pool1d(scores.unsqueeze(0), kernel, stride=1, padding=kernel // 2).squeeze(0)
    return pooled[:, : scores.shape[1]] + 1e-3 * scores


@register_policy
class SnapKVPolicy(KeepPolicy):
    """Per head: the window itself plus the top-scored earlier tokens, within the budget."""

    name = "snapkv"
    Params = SnapKVParams

    def head_scores(self, k: torch.Tensor, obs, scale: float) -> torch.Tensor | None:
        """Pooled window votes ``[H, L]`` (the window's own rows set to +inf), or None."""
        plen = k.shape[1]
        w = min(self.params.window, plen)
        scores = window_scores(obs, k, w, scale)
        if scores is None:
            return None
        scores = pooled_scores(scores, self.params.kernel)
        scores[:, plen - w:] = float("inf")
        return scores

    def select(self, layer, prompt_len, k, obs, scale):
        budget = self.prompt_budget(layer, prompt_len)
        scores = self.head_scores(k, obs, scale)
        if scores is None:
            warn_once(self.name, "no observations of the prompt; keeping sinks + recent tokens")
            return recency_keep(k.shape[0], prompt_len, budget)
        return topk_keep(scores, budget)
