"""Full attention: every causal KV token is read and kept."""

from casakv_vllm.policies.base import Capabilities, Policy
from casakv_vllm.policies.registry import register_policy


@register_policy
class DensePolicy(Policy):
    name = "dense"

    def capabilities(self) -> Capabilities:
        return Capabilities(attends_all=True, changes_prefill=False, layer_dependent=False)
