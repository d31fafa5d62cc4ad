"""Attention / KV-compression policies.

- ``base``: the :class:`Policy` class and its instance capabilities;
- ``registry``: names -> classes, ``build_policy(config)``;
- ``scorers`` / ``budgets`` / ``selection``: the parts evicting policies compose;
- ``keep``: :class:`KeepPolicy`, scorer + allocator + selection + decode hooks;
- one module per policy.
"""

from casakv_vllm.policies.base import Capabilities, Policy
from casakv_vllm.policies.registry import available_policies, build_policy, get_policy_class, register_policy
from casakv_vllm.policies import (  # noqa: F401  (register themselves)
    adakv, casakv, composite, dense, h2o, pyramidkv, snapkv, static_heads, streaming,
)

__all__ = ["Capabilities", "Policy", "available_policies", "build_policy", "get_policy_class", "register_policy"]
