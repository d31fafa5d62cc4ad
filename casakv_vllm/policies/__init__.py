"""Attention / KV-compression policies (see ``base.Policy``)."""

from casakv_vllm.policies.base import Policy, available_policies, get_policy_class, register_policy
from casakv_vllm.policies import dense, streaming  # noqa: F401  (register themselves)

__all__ = ["Policy", "available_policies", "get_policy_class", "register_policy"]
