"""The two places where casakv reaches into vLLM's platform class, kept in one file.

1. **Backend selection on the CPU platform.**  ``CpuPlatform.get_attn_backend_cls``
   ignores the selected backend and always returns CPU_ATTN.  We wrap it so
   that ``--attention-backend casakv`` selects casakv; every other choice goes
   to the original method unchanged.
2. **Config validation at start-up** (``startup.validate_startup_config``),
   after the platform's own ``check_and_update_config``.
3. **Request validation with the prompt** (``validate_request``, which vLLM calls in the API server
   with the tokenized prompt): ``casakv_question_at`` must fall inside the prompt, so a bad value is
   an HTTP 400 with one line.

The wrappers are installed once per class (a marker attribute guards them),
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


def check_question(engine_input, params) -> None:
    """``casakv_question_at`` of a request against its prompt.  Raises vLLM's ``VLLMValidationError`` (one
    line): vLLM answers it with an HTTP 400, where a plain ValueError raised here would be a 500."""
    from vllm.exceptions import VLLMValidationError

    from casakv_vllm.integration.startup import SERVER
    from casakv_vllm.requests.params import QUESTION_AT, question_at

    extra = getattr(params, "extra_args", None)
    if not extra or QUESTION_AT not in extra:
        return
    if not SERVER.casakv_scheduler:
        raise VLLMValidationError(f"casakv request parameters: {QUESTION_AT} needs casakv's scheduler (a server with "
                         "--attention-backend casakv, no --scheduler-cls of its own, on the CPU or CUDA)")
    decoder = engine_input.get("decoder_prompt", engine_input) if isinstance(engine_input, dict) else {}
    ids, embeds = decoder.get("prompt_token_ids"), decoder.get("prompt_embeds")
    prompt_len = len(ids) if ids is not None else (len(embeds) if embeds is not None else None)
    try:
        question_at(extra, prompt_len)
    except ValueError as err:
        raise VLLMValidationError(f"casakv request parameters: {err}") from None


def _wrap_request_check(platform_cls) -> None:
    if getattr(platform_cls.validate_request, _MARK, False):
        return
    original = platform_cls.validate_request

    def validate_request(cls, engine_input, params):
        original(engine_input, params)
        check_question(engine_input, params)

    validate_request.__dict__[_MARK] = True
    platform_cls.validate_request = classmethod(validate_request)


def install() -> None:
    """Install the wrappers on the current platform's class (idempotent)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    _wrap_cpu_backend_selection(platform_cls)
    _wrap_config_check(platform_cls)
    _wrap_request_check(platform_cls)
