"""The two places where casakv has to reach into vLLM 0.32, kept in one file.

1. **Backend selection on the CPU platform.**  ``CpuPlatform.get_attn_backend_cls``
   ignores the selected backend and always returns CPU_ATTN.  We wrap it so
   that ``--attention-backend casakv`` selects casakv; every other choice goes
   to the original method unchanged.
2. **Config validation at start-up.**  ``VllmConfig.__post_init__`` calls the
   platform's ``check_and_update_config`` in the process that parses the
   command line.  We wrap it to validate ``CasakvConfig`` there when casakv is
   the selected backend, so a bad value stops ``vllm serve`` with one line
   instead of an engine-core traceback.

Both wrappers are installed once per class (a marker attribute guards them),
so calling :func:`install` repeatedly, from any process, is harmless.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("casakv_vllm")

_MARK = "_casakv_wrapped"


class _ServerSettings:
    """What this process learned at start-up (read by request validation).

    ``backend_is_casakv`` stays None in processes that never saw a config
    check (then requests are validated against the defaults).
    """

    backend_is_casakv: bool | None = None
    config = None  # the validated CasakvConfig
    device_type: str | None = None  # "cpu", "cuda", ...


SERVER = _ServerSettings()


def is_casakv(backend) -> bool:
    """True when ``backend`` (an ``AttentionBackendEnum`` member or None) is casakv."""
    from casakv_vllm.plugin import BACKEND_NAME

    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME


def _running_vllm_cli() -> bool:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    return argv0 == "vllm" or argv0 == "api_server.py"


def validate_startup_config(vllm_config) -> None:
    """Validate casakv's settings for ``vllm_config``; exit with one line if bad.

    Under the ``vllm`` CLI a bad value raises ``SystemExit`` carrying a single
    line (no traceback).  Library users (``vllm.LLM``) get a
    :class:`~casakv_vllm.config.CasakvConfigError` instead.
    """
    from casakv_vllm.config import ADDITIONAL_CONFIG_KEY, CasakvConfigError, load_config

    additional = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    SERVER.backend_is_casakv = is_casakv(vllm_config.attention_config.backend)
    if not SERVER.backend_is_casakv:
        if ADDITIONAL_CONFIG_KEY in additional:
            logger.warning("casakv settings in --additional-config are ignored: the attention backend is not casakv")
        return
    from vllm.platforms import current_platform

    SERVER.device_type = current_platform.device_type
    try:
        cfg = load_config(additional)
        check_device_support(cfg.policy, SERVER.device_type)
    except CasakvConfigError as err:
        if _running_vllm_cli():
            raise SystemExit(str(err)) from None
        raise
    SERVER.config = cfg
    logger.info("casakv: policy=%s settings=%s", cfg.policy, cfg.fingerprint)


def check_device_support(policy_name: str, device_type: str | None) -> None:
    """Evicting policies run on the CPU path only (until the block-manager work lands)."""
    from casakv_vllm.config import CasakvConfigError
    from casakv_vllm.policies import get_policy_class

    if device_type not in (None, "cpu") and get_policy_class(policy_name).evicts:
        raise CasakvConfigError(
            f"casakv config error: policy '{policy_name}' evicts KV per request, which runs on the CPU path only "
            f"for now; on {device_type} use dense or streaming")


def _wrap_cpu_backend_selection(platform_cls) -> None:
    from vllm.platforms.cpu import CpuPlatform

    if not issubclass(platform_cls, CpuPlatform) or getattr(platform_cls.get_attn_backend_cls, _MARK, False):
        return
    original = platform_cls.get_attn_backend_cls  # bound to platform_cls

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not is_casakv(selected_backend):
            return original(selected_backend, attn_selector_config, num_heads=num_heads)
        backend_cls = selected_backend.get_class()
        reasons = backend_cls.validate_configuration(device_capability=None, **attn_selector_config._asdict())
        if reasons:
            raise ValueError(f"Selected backend {selected_backend.name} is not valid for this configuration: {reasons}")
        logger.info("Using CASAKV attention backend on CPU.")
        return selected_backend.get_path()

    get_attn_backend_cls.__dict__[_MARK] = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _wrap_config_check(platform_cls) -> None:
    if getattr(platform_cls.check_and_update_config, _MARK, False):
        return
    original = platform_cls.check_and_update_config

    def check_and_update_config(cls, vllm_config):
        original(vllm_config)
        validate_startup_config(vllm_config)

    check_and_update_config.__dict__[_MARK] = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def install() -> None:
    """Install both wrappers on the current platform's class (idempotent)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    _wrap_cpu_backend_selection(platform_cls)
    _wrap_config_check(platform_cls)
