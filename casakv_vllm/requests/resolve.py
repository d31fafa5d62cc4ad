"""Which policy object serves a request: the server's config plus the request's overrides.

Policies are cached by the *resulting* config, so every request that ends up
with the same settings shares one policy object, whatever it wrote in
``vllm_xargs`` (``{"casakv_policy": "dense"}`` on a dense server is the
server's own policy).
"""

from __future__ import annotations

from casakv_vllm.config import CasakvConfig
from casakv_vllm.policies import Policy, build_policy
from casakv_vllm.requests.params import merged_config


def policy_label(config: CasakvConfig) -> str:
    """Short name of a policy + budget, for metric labels: ``snapkv/kv_budget=256``."""
    if config.kv_budget is not None:
        return f"{config.policy}/kv_budget={config.kv_budget}"
    if config.kv_ratio is not None:
        return f"{config.policy}/kv_ratio={config.kv_ratio:g}"
    return config.policy


class PolicyResolver:
    """Policy objects for the server config and every override seen (one per worker)."""

    def __init__(self, base: CasakvConfig, num_layers: int):
        self.base = base
        self.num_layers = num_layers
        self._by_overrides: dict[tuple, tuple[Policy, str]] = {}
        self._by_config: dict[str, tuple[Policy, str]] = {}
        self.default, self.default_label = self.resolve(())

    def resolve(self, overrides: tuple) -> tuple[Policy, str]:
        hit = self._by_overrides.get(overrides)
        if hit is None:
            cfg = merged_config(self.base, overrides)
            hit = self._by_config.get(cfg.fingerprint)
            if hit is None:
                hit = self._by_config[cfg.fingerprint] = (build_policy(cfg, self.num_layers), policy_label(cfg))
            self._by_overrides[overrides] = hit
        return hit


def resolver_for(vllm_config) -> PolicyResolver:
    """The resolver of a server: its casakv config and the model's layer count.  Workers and the
    scheduler build theirs here, so both see the same budgets."""
    from casakv_vllm.config import load_config

    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    model = vllm_config.model_config
    hf = getattr(model, "hf_text_config", None) if model is not None else None
    return PolicyResolver(load_config(extra), int(getattr(hf, "num_hidden_layers", 1) or 1))
