"""Attention / KV-compression policies (see ``base.Policy`` and ``keep.KeepPolicy``)."""

from casakv_vllm.policies.base import Policy, available_policies, get_policy_class, register_policy
from casakv_vllm.policies import (  # noqa: F401  (register themselves)
    adakv, composite, dense, h2o, pyramidkv, snapkv, static_heads, streaming,
)

__all__ = ["Policy", "available_policies", "get_policy_class", "register_policy"]
