"""Ada-KV (Feng et al., 2024): a layer's budget shared across its heads by score."""

from __future__ import annotations

import torch
from pydantic import Field

from casakv_vllm.policies.base import register_policy
from casakv_vllm.policies.keep import recency_keep, topk_keep, warn_once
from casakv_vllm.policies.snapkv import SnapKVParams, SnapKVPolicy


class AdaKVParams(SnapKVParams):
    floor: float = Field(0.2, ge=0.0, le=1.0, description="fraction of the per-head budget every head keeps")


@register_policy
class AdaKVPolicy(SnapKVPolicy):
    """Heads compete for ``num_kv_heads * budget`` tokens on SnapKV scores.

    Every head first keeps ``floor * budget`` of its best tokens (the
    safeguard); the rest of the layer's budget goes to the highest scores of
    any head, so focused heads give tokens to diffuse ones.
    """

    name = "adakv"
    Params = AdaKVParams

    def select(self, layer, prompt_len, k, obs, scale):
        budget = self.prompt_budget(layer, prompt_len)
        num_kv = k.shape[0]
        scores = self.head_scores(k, obs, scale)
        if scores is None:
            warn_once(self.name, "no observations of the prompt; keeping sinks + recent tokens")
            return recency_keep(num_kv, prompt_len, budget)
        if budget >= prompt_len:
            return torch.ones(num_kv, prompt_len, dtype=torch.bool)
        window = torch.isinf(scores)  # the observation window: always kept
        free = budget - int(window[0].sum())
        if free <= 0:
            return topk_keep(scores, budget)
        # heads compete on attention *share* of the tokens outside the window
        finite = scores.masked_fill(window, 0.0)
        share = (finite / finite.sum(1, keepdim=True).clamp_min(1e-9)).masked_fill(window, float("-inf"))
        floor = int(self.params.floor * free)
        keep = window | (topk_keep(share, floor) if floor > 0 else torch.zeros_like(window))
        rest = num_kv * free - num_kv * floor
        if rest > 0:
            flat = share.masked_fill(keep, float("-inf")).flatten()
            keep.view(-1)[torch.topk(flat, rest).indices] = True
        return keep
