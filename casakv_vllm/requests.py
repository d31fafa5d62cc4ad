"""Which request sits in each batch row, and its own casakv settings.

vLLM's attention metadata names no requests, yet data-dependent policies
(SnapKV, H2O, ...) keep state per request across steps, and a request may pick
its own policy.  vLLM does tell one kind of plugin about requests: logits
processors (entry-point group ``vllm.logits_processors``) receive every
addition, removal and move of the persistent batch, *before* the forward pass,
with the same row indices the attention metadata uses.  So casakv ships a
logits processor that leaves logits untouched and only keeps
``rows[i] -> RequestSlot``; the metadata builder reads it once per batch.

Per-request settings travel in ``vllm_xargs`` (``SamplingParams.extra_args``)::

    {"casakv_policy": "snapkv", "casakv_kv_budget": 256,
     "casakv_policy_params": "{\\"window\\": 32}"}

They are checked in the API server (``validate_params``), so a bad value is an
HTTP 400 with a one-line reason, never an engine error.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from casakv_vllm.observations import prompt_key

#: ``vllm_xargs`` key -> ``CasakvConfig`` field.
XARGS = {
    "casakv_policy": "policy",
    "casakv_kv_budget": "kv_budget",
    "casakv_kv_ratio": "kv_ratio",
    "casakv_policy_params": "policy_params",
}

_ids = itertools.count()


def request_overrides(extra_args: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The casakv settings a request carries, as a hashable, sorted tuple.

    Raises ``ValueError`` (one line) for an unknown ``casakv_*`` key or a
    ``casakv_policy_params`` that is not a JSON object.
    """
    if not extra_args:
        return ()
    out: dict[str, Any] = {}
    for key, value in extra_args.items():
        if not key.startswith("casakv_"):
            continue
        if key not in XARGS:
            raise ValueError(f"unknown request parameter {key!r}; allowed: {', '.join(XARGS)}")
        if key == "casakv_policy_params":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ValueError(f"casakv_policy_params is not valid JSON: {err.msg}") from None
            if not isinstance(value, dict):
                raise ValueError("casakv_policy_params must be a JSON object")
            value = json.dumps(value, sort_keys=True)
        out[XARGS[key]] = value
    return tuple(sorted(out.items()))


def overrides_as_config(overrides: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """``request_overrides`` output -> keyword arguments of ``CasakvConfig``."""
    cfg = dict(overrides)
    if "policy_params" in cfg:
        cfg["policy_params"] = json.loads(cfg["policy_params"])
    return cfg


def merged_config(base, overrides: tuple[tuple[str, Any], ...]):
    """``base`` (a ``CasakvConfig``) with a request's overrides applied.

    A request naming a policy or a budget starts from that policy's defaults:
    it does not inherit the server's ``policy_params`` or the other budget.
    """
    from casakv_vllm.config import CasakvConfig

    if not overrides:
        return base
    cfg = overrides_as_config(overrides)
    data = base.model_dump()
    if "policy" in cfg and cfg["policy"] != base.policy:
        data["policy_params"] = {}
    if "kv_budget" in cfg or "kv_ratio" in cfg:
        data["kv_budget"] = data["kv_ratio"] = None
    data.update(cfg)
    return CasakvConfig(**data)


@dataclass(eq=False)
class RequestSlot:
    """One request in the batch, as casakv sees it.

    Attributes:
        prompt_len: prompt tokens (0 when vLLM gave none, e.g. embeddings).
        overrides: its ``vllm_xargs`` settings (see :func:`request_overrides`).
        key: hash of the prompt's token ids (see ``observations.prompt_key``).
        state: per-request policy state, owned by the request's policy.
        uid: process-unique number, for logs and tests.
    """

    prompt_len: int
    overrides: tuple[tuple[str, Any], ...] = ()
    key: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_ids))


class RequestTracker(LogitsProcessor):
    """A logits processor that only watches the batch (logits pass unchanged)."""

    current: "RequestTracker | None" = None  # the worker's live tracker

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        overrides = request_overrides(sampling_params.extra_args)
        if not overrides:
            return
        from casakv_vllm import vllm_hooks
        from casakv_vllm.config import CasakvConfig

        if vllm_hooks.SERVER.backend_is_casakv is False:
            raise ValueError("casakv_* request parameters need a server started with --attention-backend casakv")
        base = vllm_hooks.SERVER.config or CasakvConfig()
        try:
            cfg = merged_config(base, overrides)
            vllm_hooks.check_device_support(cfg.policy, vllm_hooks.SERVER.device_type)
        except Exception as err:  # pydantic errors: one line, HTTP 400
            raise ValueError(f"casakv request parameters: {_first_line(err)}") from None
        if cfg != base and _changes_prefill(cfg):
            raise ValueError(
                f"casakv request parameters: policy '{cfg.policy}' with these settings changes prefill attention, "
                "so only the server can choose it (prefix-cached KV would mix policies)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: list[RequestSlot | None] = []
        RequestTracker.current = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.rows
        if len(rows) < batch_update.batch_size:
            rows.extend([None] * (batch_update.batch_size - len(rows)))
        for index in batch_update.removed:
            if index < len(rows):
                rows[index] = None
        for index, params, prompt_ids, _outputs in batch_update.added:
            if index >= len(rows):
                rows.extend([None] * (index + 1 - len(rows)))
            try:
                overrides = request_overrides(params.extra_args if params is not None else None)
            except ValueError:  # validated in the API server; never fail the engine here
                overrides = ()
            if prompt_ids is not None:
                rows[index] = RequestSlot(len(prompt_ids), overrides, prompt_key(prompt_ids))
            else:
                rows[index] = RequestSlot(0, overrides)
        for a, b, direction in batch_update.moved:
            top = max(a, b)
            if top >= len(rows):
                rows.extend([None] * (top + 1 - len(rows)))
            if direction == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows[b], rows[a]
            else:
                rows[b], rows[a] = rows[a], None

    def slots(self, num_reqs: int) -> list[RequestSlot | None]:
        """The first ``num_reqs`` rows (None where unknown)."""
        head = self.rows[:num_reqs]
        return head + [None] * (num_reqs - len(head))


def current_slots(num_reqs: int) -> list[RequestSlot | None]:
    """Rows of the live tracker, or ``None`` rows when no tracker runs."""
    tracker = RequestTracker.current
    return tracker.slots(num_reqs) if tracker is not None else [None] * num_reqs


def _changes_prefill(cfg) -> bool:
    from casakv_vllm.policies import get_policy_class

    return get_policy_class(cfg.policy).from_config(cfg).changes_prefill


def _first_line(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        return f"{loc}={json.dumps(first.get('input'), default=str)}: {msg}" if loc else msg
    return str(err).splitlines()[0]
