"""A request's own casakv settings, from ``vllm_xargs`` (``SamplingParams.extra_args``)::

    {"casakv_policy": "snapkv", "casakv_kv_budget": 256,
     "casakv_policy_params": "{\\"window\\": 32}"}

They are checked in the API server (``check_request``), so a bad value is an
HTTP 400 with a one-line reason, never an engine error.

One more key is a fact about the prompt, not a setting: ``casakv_question_at``,
the prompt token where the request's question starts (the question-agnostic
protocol: the policy compresses the context ``[0, question_at)`` as if it were
the whole prompt, without seeing the question, and keeps every question token;
``question_at``).  It is checked against the prompt's length in the API server
too (``integration.platform``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

#: ``vllm_xargs`` key -> ``CasakvConfig`` field.
XARGS = {
    "casakv_policy": "policy",
    "casakv_kv_budget": "kv_budget",
    "casakv_kv_ratio": "kv_ratio",
    "casakv_kv_min": "kv_min",
    "casakv_policy_params": "policy_params",
    "casakv_chunk_size": "chunk_size",
    "casakv_prefill_compression": "prefill_compression",
}
#: ``vllm_xargs`` key of the token index where a request's question starts (not a config field)
QUESTION_AT = "casakv_question_at"


def request_overrides(extra_args: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The casakv settings a request carries, as a hashable, sorted tuple.

    Raises ``ValueError`` (one line) for an unknown ``casakv_*`` key or a
    ``casakv_policy_params`` that is not a JSON object.
    """
    if not extra_args:
        return ()
    out: dict[str, Any] = {}
    for key, value in extra_args.items():
        if not key.startswith("casakv_") or key == QUESTION_AT:
            continue
        if key not in XARGS:
            raise ValueError(f"unknown request parameter {key!r}; allowed: {', '.join([*XARGS, QUESTION_AT])}")
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


def question_at(extra_args: Mapping[str, Any] | None, prompt_len: int | None = None) -> int | None:
    """The prompt token where the request's question starts, or None (no question: the whole prompt is
    context, also when it starts at ``prompt_len``).

    Raises ``ValueError`` (one line) unless it is an int from 1 to the prompt's length (``prompt_len``
    None: only the type and sign are checked).
    """
    if not extra_args or QUESTION_AT not in extra_args:
        return None
    value = extra_args[QUESTION_AT]
    limit = "the prompt length" if prompt_len is None else f"the prompt length ({prompt_len})"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (prompt_len is not None
                                                                               and value > prompt_len):
        raise ValueError(f"{QUESTION_AT}={json.dumps(value, default=str)}: must be an int from 1 to {limit} "
                         "(the prompt token where the question starts)")
    return None if prompt_len is not None and value == prompt_len else value


def overrides_as_config(overrides: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """``request_overrides`` output -> keyword arguments of ``CasakvConfig``."""
    cfg = dict(overrides)
    if "policy_params" in cfg:
        cfg["policy_params"] = json.loads(cfg["policy_params"])
    return cfg


def merged_config(base, overrides: tuple[tuple[str, Any], ...]):
    """``base`` (a ``CasakvConfig``) with a request's overrides applied.

    A request naming a policy or a budget starts from that policy's defaults:
    it does not inherit the server's ``policy_params``, ``prefill_compression``
    or the other budget.
    """
    from casakv_vllm.config import CasakvConfig

    if not overrides:
        return base
    cfg = overrides_as_config(overrides)
    data = base.model_dump()
    if "policy" in cfg and cfg["policy"] != base.policy:
        data["policy_params"] = {}
        data["prefill_compression"] = False
    if "kv_budget" in cfg or "kv_ratio" in cfg:
        data["kv_budget"] = data["kv_ratio"] = None
    data.update(cfg)
    return CasakvConfig(**data)


def check_request(base, extra_args: Mapping[str, Any] | None, device_type: str | None):
    """The config a request with ``extra_args`` runs under, on a server configured as ``base``.

    Raises ``ValueError`` with one line (``casakv request parameters: ...``)
    for anything the server would not serve.
    """
    from casakv_vllm.config import device_support_error
    from casakv_vllm.policies import build_policy

    try:
        overrides = request_overrides(extra_args)
        cfg = merged_config(base, overrides)
        question = question_at(extra_args)
    except Exception as err:  # pydantic errors: one line, HTTP 400
        raise ValueError(f"casakv request parameters: {first_line(err)}") from None
    if question is not None and cfg.prefill_compression:
        raise ValueError(f"casakv request parameters: {QUESTION_AT} does not combine with prefill_compression "
                         "(the context would be compressed with its question's queries)")
    if cfg == base:
        return cfg
    problem = device_support_error(cfg, device_type)
    if problem:
        raise ValueError(f"casakv request parameters: {problem}")
    for which, c in (("the request's", cfg), ("the server's", base)):
        if build_policy(c).caps.changes_prefill:
            raise ValueError(
                f"casakv request parameters: {which} policy '{c.policy}' with these settings changes prefill "
                "attention, so only the server chooses it, for every request (prefix-cached KV would mix policies)")
    return cfg


def first_line(err: Exception) -> str:
    """One line of an exception; pydantic errors as ``field=value: message``."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        return f"{loc}={json.dumps(first.get('input'), default=str)}: {msg}" if loc else msg
    return str(err).splitlines()[0]
