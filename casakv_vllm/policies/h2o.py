"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention plus recent tokens."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.policies.keepset import LayerKeep
from casakv_vllm.policies.registry import register_policy
from casakv_vllm.policies.scorers import AccumulatedAttention


class H2OParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    recent_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="share of the budget for the most recent tokens")


@register_policy
class H2OPolicy(KeepPolicy):
    """The cache holds at most ``budget`` tokens per head, prompt and generated alike.

    At the end of the prompt: the ``recent`` last tokens plus the heavy hitters,
    ranked by the attention mass every prompt query gave them.  At each decode
    step the new token enters; when the cache is over budget the token with the
    least accumulated attention outside the recent window leaves.  The decode
    query's attention is added to the scores after each step.
    """

    name = "h2o"
    Params = H2OParams

    def setup(self) -> None:
        self.scorer = AccumulatedAttention()

    def recent(self, budget: int) -> int:
        return max(1, int(round(self.params.recent_ratio * budget)))

    def protect(self, num_kv: int, prompt_len: int, budget: int, device) -> torch.Tensor:
        keep = torch.zeros(num_kv, prompt_len, dtype=torch.bool, device=device)
        keep[:, prompt_len - min(self.recent(budget), budget):] = True
        return keep

    def decode_budget(self, layer: int, prompt_len: int) -> int:
        return self.prompt_budget(layer, prompt_len) if self.config.kv_budget is None else self.config.kv_budget

    def start(self, layer, prompt_len, keys, obs, scale, seq_len) -> LayerKeep:
        keep, scores = self.select_scored(layer, prompt_len, keys[:, :prompt_len], obs, scale)
        state = LayerKeep.new(keep, seq_len)
        state.scores = torch.zeros(state.mask.shape, device=state.mask.device)
        if scores is not None:
            state.scores[:, :prompt_len] = scores
        return state

    def evict(self, keep: LayerKeep, layer: int, prompt_len: int, seq_len: int, width: int) -> None:
        """Per head, the ``over`` candidates with the least accumulated attention leave (ties: the
        earliest column); all heads at once, with no host sync."""
        budget = self.decode_budget(layer, prompt_len)
        mask, acc = keep.mask, keep.scores
        mask[:, width:] = False  # not yet generated
        mask[:, width - 1] = True
        over = (mask[:, :width].sum(1) - budget).clamp_min(0)
        recent = self.recent(budget)
        candidates = mask[:, :width] & (keep.positions(width) < seq_len - recent)
        score = acc[:, :width].masked_fill(~candidates, float("inf"))
        order = torch.sort(score, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=order.device).expand_as(order))
        mask[:, :width] &= ~(candidates & (rank < over.unsqueeze(1)))

    def observe(self, keep: LayerKeep, probs: torch.Tensor) -> None:
        keep.accumulate(probs)
