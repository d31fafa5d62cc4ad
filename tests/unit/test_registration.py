"""Plugin registration against real vLLM (CPU build)."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from casakv_vllm.integration import plugin


@pytest.fixture(scope="module")
def enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    return AttentionBackendEnum


def test_register_is_idempotent(enum):
    for _ in range(3):
        plugin.register()
    assert enum._member_names_.count("CASAKV") == 1
    assert enum["CASAKV"].get_path() == plugin.BACKEND_PATH


@pytest.mark.parametrize("spelling", ["casakv", "CASAKV", "CasaKV"])
def test_cli_value_any_case(enum, spelling):
    from vllm.config.attention import AttentionConfig

    assert AttentionConfig(backend=spelling).backend is enum["CASAKV"]


def test_unknown_backend_still_rejected(enum):
    from vllm.config.attention import AttentionConfig

    with pytest.raises(Exception, match="Unknown attention backend"):
        AttentionConfig(backend="casakv2")


def test_enum_member_unpickles_in_fresh_process(enum):
    """Spawned EngineCore/worker processes unpickle the config before loading plugins."""
    payload = pickle.dumps(enum["CASAKV"])
    code = (
        "import pickle, sys\n"
        "import vllm.v1.attention.backends.registry as r\n"
        "assert 'CASAKV' not in r.AttentionBackendEnum.__members__\n"
        "m = pickle.loads(sys.stdin.buffer.read())\n"
        "print(m.name, m is r.AttentionBackendEnum['CASAKV'])\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": "none-loaded"}
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["CASAKV", "True"]


def _selector(**kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128, **kw)


def test_cpu_platform_selects_casakv_only_when_asked(enum):
    from vllm.platforms.cpu import CpuPlatform

    cpu_attn = enum["CPU_ATTN"].get_path()
    assert CpuPlatform.get_attn_backend_cls(enum["CASAKV"], _selector()) == plugin.BACKEND_PATH
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == cpu_attn
    assert CpuPlatform.get_attn_backend_cls(enum["TRITON_ATTN"], _selector()) == cpu_attn
    plugin.register()  # wrapping twice must not nest
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == cpu_attn


def test_cpu_platform_rejects_unsupported_layer_with_reason(enum):
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(ValueError, match="MLA not supported"):
        CpuPlatform.get_attn_backend_cls(enum["CASAKV"], _selector(use_mla=True))


def test_backend_class_capabilities(enum):
    backend = enum["CASAKV"].get_class()
    assert backend.get_name() == "CASAKV"
    assert backend.supports_block_size(16) and backend.supports_block_size(128) and backend.supports_block_size(24)
    assert backend.forward_includes_kv_cache_update is False
