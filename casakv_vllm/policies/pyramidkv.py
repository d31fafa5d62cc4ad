"""PyramidKV (Cai et al., 2024): SnapKV selection with budgets shrinking with depth."""

from __future__ import annotations

from pydantic import Field

from casakv_vllm.policies.base import register_policy
from casakv_vllm.policies.snapkv import SnapKVParams, SnapKVPolicy


class PyramidKVParams(SnapKVParams):
    beta: float = Field(20.0, gt=1.0, description="top layer keeps budget/beta; layer budgets are arithmetic")


@register_policy
class PyramidKVPolicy(SnapKVPolicy):
    """Layer ``l`` of ``L`` keeps ``b_l`` tokens, linear in ``l``, averaging the budget.

    The last layer keeps ``b / beta``, the first ``2b - b / beta``; the mean over
    layers is the configured budget ``b`` (as in the paper).
    """

    name = "pyramidkv"
    Params = PyramidKVParams

    def prompt_budget(self, layer, prompt_len):
        mean = super().prompt_budget(layer, prompt_len)
        layers = self.num_layers or 1
        if layers == 1 or mean >= prompt_len:
            return mean
        low = mean / self.params.beta
        high = 2 * mean - low
        b = high - (high - low) * layer / (layers - 1)
        return max(1, min(prompt_len, round(b)))
