"""Start-up validation of casakv's settings, and what the API-server process learned from it.

``VllmConfig.__post_init__`` calls the platform's ``check_and_update_config``
in the process that parses the command line; ``platform.install`` wraps it to
call :func:`validate_startup_config`, so a bad value stops ``vllm serve`` with
one line instead of an engine-core traceback.  Request validation in that
process (``tracker.RequestTracker.validate_params``, a classmethod vLLM calls
without any config) reads the outcome from :data:`SERVER`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

logger = logging.getLogger("casakv_vllm")


@dataclass
class ServerSettings:
    """What this process learned at start-up.

    ``backend_is_casakv`` stays None in processes that never saw a config
    check (then requests are validated against the defaults).
    """

    backend_is_casakv: bool | None = None
    config: object | None = None  # the validated CasakvConfig
    device_type: str | None = None  # "cpu", "cuda", ...
    casakv_scheduler: bool = False  # casakv's scheduler runs (compaction frees blocks; questions stay uncached)


SERVER = ServerSettings()


def is_casakv(backend) -> bool:
    """True when ``backend`` (an ``AttentionBackendEnum`` member or None) is casakv."""
    from casakv_vllm.integration.backend import BACKEND_NAME

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
    from casakv_vllm.config import ADDITIONAL_CONFIG_KEY, CasakvConfigError, device_support_error, load_config

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
        problem = device_support_error(cfg, SERVER.device_type)
        if problem:
            raise CasakvConfigError(f"casakv config error: {problem}")
    except CasakvConfigError as err:
        if _running_vllm_cli():
            raise SystemExit(str(err)) from None
        raise
    SERVER.config = cfg
    _use_block_manager_plugin(vllm_config)
    logger.info("casakv: policy=%s settings=%s", cfg.policy, cfg.fingerprint)


def _use_block_manager_plugin(vllm_config) -> None:
    """Name casakv's scheduler (which carries the block-manager plugin): the twin of vLLM's synchronous or
    async scheduler, whichever vLLM chose.  Beside a scheduler of the user's own, evicting policies only
    mask (``compaction_enabled`` tells the workers)."""
    from casakv_vllm.config import EVICTING_DEVICES
    from casakv_vllm.integration.scheduler import ASYNC_PATH, PATH

    sched = vllm_config.scheduler_config
    if SERVER.device_type not in EVICTING_DEVICES:
        return
    ours = ASYNC_PATH if getattr(sched, "async_scheduling", False) else PATH
    if sched.scheduler_cls not in (None, PATH, ASYNC_PATH):
        logger.warning("casakv: --scheduler-cls %s is set, so evicting policies mask without freeing blocks",
                       sched.scheduler_cls)
        return
    sched.scheduler_cls = ours
    SERVER.casakv_scheduler = True
