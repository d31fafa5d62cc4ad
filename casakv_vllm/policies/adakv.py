"""Ada-KV (Feng et al., 2024): a layer's budget shared across its heads by attention share."""

from __future__ import annotations

from pydantic import Field

from casakv_vllm.policies.budgets import HeadAdaptive
from casakv_vllm.policies.registry import register_policy
from casakv_vllm.policies.snapkv import AdaptiveParams, SnapKVPolicy


class AdaKVParams(AdaptiveParams):
    floor: float = Field(0.2, ge=0.0, le=1.0, description="fraction of the per-head budget every head keeps")


@register_policy
class AdaKVPolicy(SnapKVPolicy):
    """Heads compete for ``Hkv * budget`` tokens (``budgets.HeadAdaptive``)."""

    name = "adakv"
    Params = AdaKVParams

    def setup(self) -> None:
        super().setup()
        self.allocator = HeadAdaptive(self.params.floor)
