"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention plus recent tokens."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.observations import group_sum
from casakv_vllm.policies.base import register_policy
from casakv_vllm.policies.keep import KeepPolicy, recency_keep, topk_keep, warn_once, window_scores


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
    needs_col_sums = True
    observes_decode = True

    def recent(self, budget: int) -> int:
        return max(1, int(round(self.params.recent_ratio * budget)))

    def start(self, layer, state, prompt_len, k, obs, scale):
        keep, acc = self._select_with_scores(layer, prompt_len, k, obs, scale)
        full = torch.zeros(k.shape[0], prompt_len + 64)
        if acc is not None:
            full[:, :prompt_len] = acc
        state[("acc", layer)] = full
        return keep

    def select(self, layer, prompt_len, k, obs, scale):
        return self._select_with_scores(layer, prompt_len, k, obs, scale)[0]

    def _select_with_scores(self, layer, prompt_len, k, obs, scale):
        budget = self.prompt_budget(layer, prompt_len)
        num_kv = k.shape[0]
        recent = self.recent(budget)
        if obs is not None and obs.col_sums is not None and obs.col_rows == prompt_len:
            acc = obs.col_sums.clone()
        else:
            warn_once(self.name, "prompt attention mass not recorded (prefix cache hit?); scoring by the last queries")
            acc = window_scores(obs, k, 64, scale)
            if acc is None:
                return recency_keep(num_kv, prompt_len, budget), None
        protect = torch.zeros(num_kv, prompt_len, dtype=torch.bool)
        protect[:, prompt_len - min(recent, budget):] = True
        return topk_keep(acc, budget, protect), acc

    def before_decode(self, layer, state, keep, prompt_len, seq_len):
        budget = self.prompt_budget(layer, prompt_len) if self.config.kv_budget is None else self.config.kv_budget
        acc = state.get(("acc", layer))
        if acc is None:
            return
        if acc.shape[1] < keep.shape[1]:
            grown = torch.zeros(acc.shape[0], keep.shape[1])
            grown[:, : acc.shape[1]] = acc
            acc = state[("acc", layer)] = grown
        keep[:, seq_len:] = False  # not yet generated
        keep[:, seq_len - 1] = True
        recent = self.recent(budget)
        over = keep[:, :seq_len].sum(1) - budget
        if int(over.max()) <= 0:
            return
        candidates = keep[:, :seq_len].clone()
        candidates[:, max(0, seq_len - recent):] = False
        score = acc[:, :seq_len].masked_fill(~candidates, float("inf"))
        for head in torch.nonzero(over > 0).flatten().tolist():
            n = int(over[head])
            idx = torch.topk(score[head], n, largest=False).indices
            keep[head, idx] = False

    def on_decode(self, layer, state, keep, probs):
        acc = state.get(("acc", layer))
        if acc is not None and probs is not None:
            acc[:, : probs.shape[-1]] += group_sum(probs, acc.shape[0]).reshape(acc.shape[0], -1)
