"""Composition: the union of several evicting policies' keep-sets, each with a share of the budget."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.policies.registry import get_policy_class, register_policy
from casakv_vllm.policies.base import Capabilities


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: str
    share: float = Field(..., gt=0.0, le=1.0, description="fraction of the budget this member selects")
    policy_params: dict[str, Any] = Field(default_factory=dict)


class CompositeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: tuple[Member, ...] = Field(..., min_length=2)

    @field_validator("members")
    @classmethod
    def _shares_fit(cls, members):
        if sum(m.share for m in members) > 1.0 + 1e-9:
            raise ValueError("member shares must sum to at most 1")
        return members


@register_policy
class CompositePolicy(KeepPolicy):
    """Keep what any member keeps; member ``i`` selects ``share_i`` of the budget.

    Example: ``{"members": [{"policy": "streaming", "share": 0.25,
    "policy_params": {"scope": "decode"}}, {"policy": "snapkv", "share": 0.75}]}``
    keeps sinks and a recent window plus SnapKV's picks.  Members must select
    once at the end of the prompt (no decode-time eviction such as H2O's).
    """

    name = "composite"
    Params = CompositeParams

    def setup(self) -> None:
        self.members = [self.member(m, self.config, self.num_layers) for m in self.params.members]

    def capabilities(self) -> Capabilities:
        return Capabilities(changes_prefill=False, evicts=True,
                            needs_col_sums=any(m.caps.needs_col_sums for m in self.members))

    @staticmethod
    def member(m: Member, config, num_layers: int = 1) -> KeepPolicy:
        cls = get_policy_class(m.policy)
        if not issubclass(cls, KeepPolicy) or cls is CompositePolicy:
            raise ValueError(f"member policy '{m.policy}' cannot be composed (needs a select-once evicting policy)")
        budget = {}
        if config.kv_budget is not None:
            budget["kv_budget"] = max(1, round(m.share * config.kv_budget))
        else:
            budget["kv_ratio"] = max(1e-6, m.share * config.kv_ratio)
            budget["kv_min"] = round(m.share * config.kv_min)
        sub = config.model_copy(update={"policy": m.policy, "policy_params": m.policy_params, **budget})
        policy = cls(cls.validate_params(m.policy_params), sub, num_layers)
        if not policy.caps.evicts:
            raise ValueError(f"member policy '{m.policy}' must evict (e.g. streaming with scope 'decode')")
        if policy.caps.observes_decode:
            raise ValueError(f"member policy '{m.policy}' cannot be composed (needs a select-once evicting policy)")
        return policy

    @classmethod
    def validate_config(cls, params, config) -> None:
        super().validate_config(params, config)
        for m in params.members:
            cls.member(m, config)

    def slot_budget(self, prompt_len: int, num_kv_heads: int) -> int:
        return min(prompt_len, sum(m.slot_budget(prompt_len, num_kv_heads) for m in self.members))

    def select_scored(self, layer, prompt_len, keys, obs, scale):
        keep = torch.zeros(keys.shape[0], prompt_len, dtype=torch.bool, device=keys.device)
        for member in self.members:
            keep |= member.select(layer, prompt_len, keys, obs, scale)
        return keep, None
