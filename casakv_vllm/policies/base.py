"""What a policy is, and the registry that names them.

A policy decides, per request, layer and KV head, which cached tokens
attention may read and which the cache keeps.  Each policy is one small class
with a pydantic ``Params`` model for its ``policy_params``; the registry maps
``CasakvConfig.policy`` names to classes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    import torch

    from casakv_vllm.config import CasakvConfig
    from casakv_vllm.triton_kernels.patterns import PatternBatch


class NoParams(BaseModel):
    """A policy without parameters: any key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Policy:
    """Base class of all policies.

    Class attributes:
        name: the name users give in ``CasakvConfig.policy``.
        Params: pydantic model of ``policy_params``.
        attends_all: capability flag; True when attention reads every causal
            KV token (the dense path: no index building, no masks).
        changes_prefill: prefill attention differs from full attention, so the
            KV it produces differs too; such a policy cannot be chosen per
            request (prefix-cached blocks would mix policies).
        evicts: acts through per-request keep-sets at decode
            (:class:`~casakv_vllm.policies.keep.KeepPolicy`).
        layer_dependent: ``patterns()`` differs between layers (else it is
            computed once per batch and shared by all layers).
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    attends_all: ClassVar[bool] = False
    changes_prefill: ClassVar[bool] = True
    evicts: ClassVar[bool] = False
    layer_dependent: ClassVar[bool] = True

    def __init__(self, params: BaseModel, config: "CasakvConfig | None" = None):
        self.params = params
        self.config = config

    @classmethod
    def from_config(cls, config: "CasakvConfig") -> "Policy":
        return cls(cls.validate_params(config.policy_params), config)

    @classmethod
    def validate_config(cls, params: BaseModel, config: "CasakvConfig") -> None:
        """Cross-check params against the rest of the config; raise ValueError (one line)."""

    def patterns(self, layer: int, seq_lens: list[int], num_kv_heads: int,
                 device: "torch.device") -> "PatternBatch | None":
        """Attention patterns of one layer for a batch (row ``i`` = request ``i``).

        Args:
            layer: layer index within the model.
            seq_lens: host ints, total KV length of each request.
        Returns:
            A :class:`PatternBatch`, or None when attention is dense causal
            (only for ``attends_all`` policies).
        """
        if self.attends_all:
            return None
        raise TypeError(f"policy {self.name!r} must implement patterns()")

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> BaseModel:
        """Check ``policy_params``; raise ``ValueError`` with a one-line reason."""
        try:
            return cls.Params(**dict(params))
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                allowed = ", ".join(cls.Params.model_fields) or "none"
                raise ValueError(f"unknown parameter '{loc}' (allowed: {allowed})") from None
            value = json.dumps(first.get("input"), default=str)
            raise ValueError(f"{loc}={value}: {first['msg']}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


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
