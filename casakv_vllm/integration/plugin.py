"""vLLM plugin entry point (group ``vllm.general_plugins``, name ``casakv``).

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers; fork or spawn), possibly more than once per process.  Every
step here is idempotent.
"""

from __future__ import annotations

import logging

from casakv_vllm.integration.backend import BACKEND_NAME, BACKEND_PATH  # noqa: F401  (re-exported)

logger = logging.getLogger("casakv_vllm")


def register() -> None:
    """Make ``--attention-backend casakv`` valid and wire casakv into vLLM."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from casakv_vllm.integration import platform
    from casakv_vllm.metrics.collector import install_collector

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        member = AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)
        # Spawned processes (EngineCore, workers) unpickle the VllmConfig
        # before they load plugins; a plain enum pickle would look the value
        # up in an enum that does not have it yet.  Pickle the member as a
        # call to casakv_backend_enum(), which registers it first.
        member.__dict__["__reduce_ex__"] = _reduce_member
    platform.install()
    install_collector()


def _reduce_member(protocol):
    return casakv_backend_enum, ()


def casakv_backend_enum():
    """The ``AttentionBackendEnum`` member for casakv (registering it if needed)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    return AttentionBackendEnum[BACKEND_NAME]
