"""What a policy is: a small class with pydantic ``Params`` and its capabilities.

A policy decides, per request, layer and KV head, which cached tokens
attention may read and which the cache keeps.  Pattern policies (``dense``,
``streaming`` with ``scope: all``) give static structure through
``patterns()``; evicting policies (``keep.KeepPolicy``) compose a scorer, a
budget allocator and one selection.

Capabilities live on the *instance* (``policy.caps``): parameters can change
them (``streaming``'s ``scope``), so nothing may read them off a class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    import torch

    from casakv_kernels.patterns import PatternBatch
    from casakv_vllm.config import CasakvConfig
    from casakv_vllm.observe.store import LayerObservation


class NoParams(BaseModel):
    """A policy without parameters: any key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Capabilities:
    """What the runtime needs to know about a policy instance.

    Attributes:
        attends_all: attention reads every causal KV token (the dense path).
        changes_prefill: prefill attention differs from full attention, so the
            KV it produces differs too; such a policy cannot be chosen per
            request (prefix-cached blocks would mix policies).
        evicts: acts through per-request keep-sets once decoding starts.
        layer_dependent: ``patterns()`` differs between layers.
        needs_col_sums: wants every prompt query's attention mass (an extra
            attention pass while the prompt is prefilled).
        observes_decode: wants each decode step's attention probabilities.
    """

    attends_all: bool = False
    changes_prefill: bool = True
    evicts: bool = False
    layer_dependent: bool = True
    needs_col_sums: bool = False
    observes_decode: bool = False


class Policy:
    """Base class of all policies.

    Class attributes:
        name: the name users give in ``CasakvConfig.policy``.
        Params: pydantic model of ``policy_params``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, config: "CasakvConfig", num_layers: int = 1):
        self.params = params
        self.config = config
        self.num_layers = num_layers
        self.setup()
        self.caps = self.capabilities()

    def setup(self) -> None:
        """Build the policy's parts from ``params`` (runs before ``capabilities``)."""

    def capabilities(self) -> Capabilities:
        return Capabilities()

    @classmethod
    def from_config(cls, config: "CasakvConfig", num_layers: int = 1) -> "Policy":
        return cls(cls.validate_params(config.policy_params), config, num_layers)

    @classmethod
    def validate_config(cls, params: BaseModel, config: "CasakvConfig") -> None:
        """Cross-check params against the rest of the config; raise ValueError (one line)."""

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

    def patterns(self, layer: int, seq_lens: list[int], num_kv_heads: int,
                 device: "torch.device") -> "PatternBatch | None":
        """Attention patterns of one layer for a batch of this policy's rows.

        Args:
            layer: layer index within the model.
            seq_lens: host ints, total KV length of each row.
        Returns:
            A :class:`PatternBatch` (one row per entry of ``seq_lens``), or
            None when attention is dense causal.
        """
        return None

    def sparse_prefill_from(self, prompt_len: int) -> float:
        """Sequence length from which this policy's prefill chunks of a ``prompt_len``-token prompt are
        computed under their own estimated patterns (``prefill_patterns``; inf: never)."""
        return float("inf")

    def prefill_patterns(self, store: dict, layer: int, q: "torch.Tensor", keys: Callable[[], "torch.Tensor"],
                         context_len: int, seq_len: int, scale: float, final: bool = False,
                         obs: "LayerObservation | None" = None) -> "PatternBatch":
        """The patterns a sparse prefill chunk (queries ``context_len .. seq_len - 1``, ``q`` ``[H, n, D]``;
        ``keys()`` gathers the ``[Hkv, seq_len, D]`` keys so far, only when the policy reads them;
        ``final``: the prompt's last chunk) is computed under; ``store``: the request's, per layer; ``obs``:
        the observed prompt's, when this chunk ends it (what ``on_prompt_observed`` noted there, earlier in
        the same layer call).  Only called for rows ``sparse_prefill_from`` admits, which is never here."""
        raise RuntimeError(f"casakv: a sparse prefill row was planned for policy {self.name}, which has none")

    def observes_prompt_end(self) -> bool:
        """It derives something from the prompt's end at every layer (``on_prompt_observed``)."""
        return type(self).on_prompt_observed is not Policy.on_prompt_observed

    def on_prompt_observed(self, layer: int, obs: "LayerObservation", keys: "torch.Tensor", scale: float) -> None:
        """Runs in each layer's forward of the prefill chunk that ends the prompt (the context, with a
        question), after its observations are recorded; ``keys`` ``[Hkv, prompt_len, D]``.  What it derives
        goes into ``obs.notes`` (the prompt's, shared by all layers), read when decoding starts."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"
