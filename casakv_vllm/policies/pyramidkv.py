"""PyramidKV (Cai et al., 2024): SnapKV selection with budgets shrinking with depth."""

from __future__ import annotations

from pydantic import Field

from casakv_vllm.policies.budgets import Pyramid
from casakv_vllm.policies.registry import register_policy
from casakv_vllm.policies.snapkv import AdaptiveParams, SnapKVPolicy


class PyramidKVParams(AdaptiveParams):
    beta: float = Field(20.0, gt=1.0, description="the last layer keeps 1/beta of the mean share above the window")


@register_policy
class PyramidKVPolicy(SnapKVPolicy):
    """Layer budgets fall linearly with depth and average the budget; none drops below the window
    (``budgets.Pyramid``)."""

    name = "pyramidkv"
    Params = PyramidKVParams

    def setup(self) -> None:
        super().setup()
        self.allocator = Pyramid(self.params.beta, floor=self.params.window)
