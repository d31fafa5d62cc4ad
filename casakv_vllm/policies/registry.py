"""Policy names -> classes, and building a policy from a config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from casakv_vllm.policies.base import Policy

if TYPE_CHECKING:
    from casakv_vllm.config import CasakvConfig

_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` selectable as ``policy=cls.name``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"policy name {cls.name!r} is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_policy_class(name: str) -> type[Policy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def build_policy(config: "CasakvConfig", num_layers: int = 1) -> Policy:
    """The policy ``config`` names, with its parameters (``config`` is already validated)."""
    return get_policy_class(config.policy).from_config(config, num_layers)
