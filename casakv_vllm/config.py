"""`CasakvConfig`: every casakv setting, validated once, in one place.

Sources, later ones winning field by field (``policy_params`` is merged key by
key):

1. defaults below;
2. the file named by ``CASAKV_CONFIG`` (JSON, or YAML for ``.yaml``/``.yml``);
3. vLLM's ``--additional-config '{"casakv": {...}}'``.

A bad value raises :class:`CasakvConfigError` whose message is one line naming
the field, the value and what is allowed.  At ``vllm serve`` start-up that
line is all the user sees (see ``casakv_vllm.integration.platform``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_VAR = "CASAKV_CONFIG"
ADDITIONAL_CONFIG_KEY = "casakv"


class CasakvConfigError(ValueError):
    """A casakv setting is invalid.  ``str(err)`` is a single line."""


class CasakvConfig(BaseModel):
    """All casakv settings.

    Budgets are per request, layer and KV head: ``kv_budget`` is an absolute
    number of tokens kept, ``kv_ratio`` the kept fraction (``0.25`` = 4x).
    At most one of them may be set; neither means "no compression".  A ratio
    never keeps fewer than ``kv_min`` tokens: a short chat prompt is kept whole.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field("dense", description="attention/compression policy name")
    kv_budget: int | None = Field(None, ge=1, description="KV tokens kept per request, layer and head")
    kv_ratio: float | None = Field(None, gt=0.0, le=1.0, description="fraction of KV kept (0.25 = 4x)")
    kv_min: int = Field(128, ge=0, description="with kv_ratio: a prompt of at most kv_min tokens is kept whole, "
                        "and a longer one keeps at least kv_min tokens per layer and KV head (0: the ratio alone)")
    policy_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the chosen policy")
    chunk_size: int | None = Field(256, ge=16, description="tokens between compactions of an evicting "
                                   "policy's cache: generated tokens, and prompt tokens with prefill_compression "
                                   "(null: compact once, when decoding starts)")
    prefill_compression: bool = Field(False, description="compress the KV of a long prompt while it is prefilled, "
                                      "every chunk_size tokens, ranked by each prefill chunk's last queries "
                                      "(CASAK-V's chunk-wise compression: the prompt is then attended through "
                                      "its compressed KV)")
    metrics: bool = Field(True, description="export casakv_* Prometheus series")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from casakv_vllm.policies import available_policies

        names = available_policies()
        if value not in names:
            raise ValueError(f"must be one of {', '.join(sorted(names))}")
        return value

    @model_validator(mode="after")
    def _policy_params_fit(self) -> "CasakvConfig":
        if self.kv_budget is not None and self.kv_ratio is not None:
            raise ValueError("set kv_budget or kv_ratio, not both")
        from casakv_vllm.policies import get_policy_class

        policy_cls = get_policy_class(self.policy)
        try:
            policy_cls.validate_config(policy_cls.validate_params(self.policy_params), self)
        except ValueError as err:
            raise ValueError(f"policy_params for policy '{self.policy}': {err}") from None
        if self.prefill_compression:
            if self.chunk_size is None:
                raise ValueError("prefill_compression compresses every chunk_size tokens: set chunk_size")
            if not getattr(policy_cls.from_config(self), "selects_once", lambda: False)():
                raise ValueError(f"prefill_compression needs a policy that selects its tokens once (snapkv, "
                                 f"pyramidkv, adakv, static-heads, composite), not '{self.policy}'")
        return self

    @property
    def fingerprint(self) -> str:
        """Stable JSON of the settings (for logs and metric labels)."""
        return json.dumps(self.model_dump(), sort_keys=True)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "casakv"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(CasakvConfig.model_fields)
        return f"casakv config error ({source}): unknown field '{loc}'; allowed fields: {allowed}"
    if first["loc"]:
        value = first.get("input")
        return f"casakv config error ({source}): {loc}={json.dumps(value, default=str)}: {msg}"
    return f"casakv config error ({source}): {msg}"


def _read_file(path_str: str) -> dict[str, Any]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise CasakvConfigError(f"casakv config error ({ENV_VAR}): {path_str!r} is not a readable file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json/yaml syntax errors: report, never a traceback
        detail = str(err).splitlines()[0]
        raise CasakvConfigError(f"casakv config error ({ENV_VAR}={path_str}): cannot parse: {detail}") from None
    if data is None:
        return {}
    if isinstance(data, dict) and ADDITIONAL_CONFIG_KEY in data and len(data) == 1:
        data = data[ADDITIONAL_CONFIG_KEY]
    if not isinstance(data, dict):
        raise CasakvConfigError(
            f"casakv config error ({ENV_VAR}={path_str}): top level must be a mapping, got {type(data).__name__}"
        )
    return data


def load_config(
    additional_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CasakvConfig:
    """Build the effective :class:`CasakvConfig` (see module docstring)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources = []
    if environ.get(ENV_VAR):
        merged.update(_read_file(environ[ENV_VAR]))
        sources.append(f"{ENV_VAR}={environ[ENV_VAR]}")
    extra = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise CasakvConfigError(
                "casakv config error (--additional-config): 'casakv' must be a JSON object, "
                f"got {json.dumps(extra, default=str)}"
            )
        params = {**merged.get("policy_params", {}), **extra.get("policy_params", {})}
        merged.update(extra)
        if params:
            merged["policy_params"] = params
        sources.append("--additional-config")
    try:
        return CasakvConfig(**merged)
    except ValidationError as err:
        raise CasakvConfigError(_one_line(err, " + ".join(sources) or "defaults")) from None


#: devices whose path serves evicting policies (keep-sets, compaction, freed blocks)
EVICTING_DEVICES = ("cpu", "cuda")


def device_support_error(config: CasakvConfig, device_type: str | None) -> str | None:
    """Why ``config`` cannot be served on ``device_type`` (None when it can).

    Asks the policy *instance*: parameters change capabilities (``streaming``
    with ``scope: all`` is a pattern policy, with ``scope: decode`` it evicts).
    """
    from casakv_vllm.policies import build_policy

    if device_type in (None, *EVICTING_DEVICES) or not build_policy(config).caps.evicts:
        return None
    return (f"policy '{config.policy}' evicts KV per request, which runs on the CPU and CUDA paths only; "
            f"on {device_type} use dense or streaming (scope: all)")
