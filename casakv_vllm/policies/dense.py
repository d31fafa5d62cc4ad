"""Full attention: every causal KV token is read and kept."""

from casakv_vllm.policies.base import Policy, register_policy


@register_policy
class DensePolicy(Policy):
    name = "dense"
    attends_all = True
    changes_prefill = False
    layer_dependent = False
