"""SnapKV (Li et al., 2024): keep the prompt tokens the prompt's last queries attend to."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.policies.registry import register_policy
from casakv_vllm.policies.scorers import AccumulatedAttention, WindowVotes


class SnapKVParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    window: int = Field(32, ge=1, le=64, description="observation window: last prompt queries that vote")
    kernel: int = Field(7, ge=1, le=63, description="max-pool width over key positions (odd)")


class AdaptiveParams(SnapKVParams):
    scorer: Literal["snapkv", "h2o"] = Field(
        "snapkv", description="token scores: SnapKV's window votes, or H2O's accumulated attention")


@register_policy
class SnapKVPolicy(KeepPolicy):
    """Per head: the window itself plus the top-scored earlier tokens, within the budget."""

    name = "snapkv"
    Params = SnapKVParams

    def setup(self) -> None:
        if getattr(self.params, "scorer", "snapkv") == "h2o":
            self.scorer = AccumulatedAttention()
        else:
            self.scorer = WindowVotes(self.params.window, self.params.kernel)

    def pinned(self, prompt_len: int) -> int:
        return min(self.params.window, prompt_len) if isinstance(self.scorer, WindowVotes) else 0
