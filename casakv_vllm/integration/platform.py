"""The two places where casakv reaches into vLLM's platform class, kept in one file.

1. **Backend selection on the CPU platform.**  ``CpuPlatform.get_attn_backend_cls``
   ignores the selected backend and always returns CPU_ATTN.  We wrap it so
   that ``--attention-backend casakv`` selects casakv; every other choice goes
   to the original method unchanged.
2. **Config validation at start-up** (``startup.validate_startup_config``),
   after the platform's own ``check_and_update_config``.

Both wrappers are installed once per class (a marker attribute guards them),
so calling :func:`install` repeatedly, from any process, is harmless.
"""

from __future__ import annotations

import logging

from casakv_vllm.integration.startup import is_casakv, validate_startup_config

logger = logging.getLogger("casakv_vllm")

_MARK = "_casakv_wrapped"


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
