"""Per-batch plan: which policy serves each row, with its request state.

Built once per batch by the metadata builder (``plan_batch``); the layers'
forward calls only read it.  Policies are resolved from the server's
``CasakvConfig`` plus each request's ``vllm_xargs`` overrides, and cached by
those overrides, so a batch of requests with the same settings shares one
policy object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from casakv_vllm.config import CasakvConfig
from casakv_vllm.observations import STORE, PromptObservations
from casakv_vllm.policies import Policy, get_policy_class
from casakv_vllm.requests import RequestSlot, current_slots, merged_config


def policy_label(config: CasakvConfig) -> str:
    """Short name of a policy + budget, for metric labels: ``snapkv/kv_budget=256``."""
    if config.kv_budget is not None:
        return f"{config.policy}/kv_budget={config.kv_budget}"
    if config.kv_ratio is not None:
        return f"{config.policy}/kv_ratio={config.kv_ratio:g}"
    return config.policy


class PolicyResolver:
    """Policy objects for the server config and every override seen (worker-local)."""

    def __init__(self, base: CasakvConfig, num_layers: int):
        self.base = base
        self.num_layers = num_layers
        self._cache: dict[tuple, tuple[Policy, str]] = {}
        self.default, self.default_label = self.resolve(())

    def resolve(self, overrides: tuple) -> tuple[Policy, str]:
        hit = self._cache.get(overrides)
        if hit is None:
            cfg = merged_config(self.base, overrides)
            policy = get_policy_class(cfg.policy).from_config(cfg)
            policy.num_layers = self.num_layers
            hit = self._cache[overrides] = (policy, policy_label(cfg))
        return hit


@dataclass
class RowPlan:
    """One batch row: its policy, its request (None if unknown) and prompt observations."""

    policy: Policy
    label: str
    slot: RequestSlot | None
    obs: PromptObservations | None


@dataclass
class BatchPlan:
    """Everything per batch; ``memo`` holds structures derived once per batch
    (patterns of layer-independent policies, decode block selections) so the
    layers do not rebuild them."""

    rows: list[RowPlan]
    uniform: Policy | None  # the one policy of every row, else None
    memo: dict = field(default_factory=dict)

    @property
    def any_evicting(self) -> bool:
        return any(r.policy.evicts for r in self.rows)

    def patterns(self, layer: int, seq_lens: list[int], num_kv_heads: int, device):
        """The uniform policy's patterns for ``layer`` (computed once per batch when layer-independent)."""
        policy = self.uniform
        key = ("patterns", layer if policy.layer_dependent else None)
        if key not in self.memo:
            self.memo[key] = policy.patterns(layer, seq_lens, num_kv_heads, device)
        return self.memo[key]


def plan_batch(resolver: PolicyResolver, num_reqs: int) -> BatchPlan:
    rows = []
    for slot in current_slots(num_reqs):
        if slot is None or not slot.overrides:
            policy, label = resolver.default, resolver.default_label
        else:
            policy, label = resolver.resolve(slot.overrides)
        obs = None
        if policy.evicts and slot is not None and slot.key is not None:
            obs = STORE.get(slot.key, slot.prompt_len)
        rows.append(RowPlan(policy, label, slot, obs))
    first = rows[0].policy if rows else resolver.default
    uniform = first if all(r.policy is first for r in rows) else None
    return BatchPlan(rows, uniform)
