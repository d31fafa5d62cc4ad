"""The optional CUDA extension (``casakv_vllm._C``, built from csrc/ by
setup.py where nvcc is present): probed once, and each op looked up by name.
Callers fall back to their Triton kernel when :func:`cuda_op` gives None."""

from __future__ import annotations

import torch

_LOADED: bool | None = None  # None: not probed yet


def extension_loaded() -> bool:
    """True when ``casakv_vllm._C`` imported (its ops are registered)."""
    global _LOADED
    if _LOADED is None:
        try:
            import casakv_vllm._C  # noqa: F401  (registers torch.ops.casakv.*)
            _LOADED = True
        except ImportError:
            _LOADED = False
    return _LOADED


def cuda_op(name: str):
    """``torch.ops.casakv.<name>`` from the CUDA extension, or None when the
    extension is not built (CPU boxes, wheels built without nvcc) or lacks
    the op (an older build)."""
    if not extension_loaded():
        return None
    try:
        return getattr(torch.ops.casakv, name)
    except (AttributeError, RuntimeError):
        return None
