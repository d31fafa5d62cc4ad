"""Policies: registry, params validation, patterns, and the CPU path applying them."""

import pytest
import torch

from casakv_vllm.attention.cpu_path import cpu_attention
from casakv_vllm.config import CasakvConfigError, load_config
from casakv_vllm.policies import available_policies, get_policy_class
from casakv_vllm.triton_kernels.patterns import pattern_mask
from casakv_vllm.triton_kernels.reference import gather_kv


def _policy(settings):
    cfg = load_config({"casakv": settings}, environ={})
    return get_policy_class(cfg.policy).from_config(cfg)


def test_registry_has_dense_and_streaming():
    assert {"dense", "streaming"} <= set(available_policies())


def test_dense_has_no_patterns():
    assert _policy({}).patterns(0, [10, 20], 3, "cpu") is None


@pytest.mark.parametrize("settings,seq_len,window", [
    ({"policy": "streaming", "policy_params": {"sink": 4, "window": 32}}, 500, 32),
    ({"policy": "streaming", "kv_budget": 128}, 500, 124),
    ({"policy": "streaming", "kv_ratio": 0.25, "policy_params": {"sink": 8}}, 400, 92),
])
def test_streaming_window_from_params_or_budget(settings, seq_len, window):
    pat = _policy(settings).patterns(0, [seq_len, 60], 2, "cpu")
    assert pat.window[0].tolist() == [window, window]
    assert pat.sparse_only and not pat.full.any()  # the promise the prefill kernel's tile plan relies on
    mask = pattern_mask(pat, 0, torch.tensor([seq_len - 1]), seq_len)
    sink = settings.get("policy_params", {}).get("sink", 4)
    assert int(mask[0].sum()) == sink + window  # KV kept per head at the last position


@pytest.mark.parametrize("settings,msg", [
    ({"policy": "streaming"}, "needs policy_params.window"),
    ({"policy": "streaming", "kv_budget": 4}, "must exceed sink"),
    ({"policy": "streaming", "policy_params": {"window": 0}}, "window=0"),
    ({"policy": "streaming", "policy_params": {"sinks": 4}, "kv_budget": 64}, "unknown parameter 'sinks'"),
])
def test_streaming_bad_config(settings, msg):
    with pytest.raises(CasakvConfigError, match=msg):
        load_config({"casakv": settings}, environ={})


def test_cpu_path_applies_streaming_pattern():
    """Masked attention == attention over exactly the kept positions, per head."""
    g = torch.Generator().manual_seed(0)
    hkv, group, d, bs, seq = 2, 3, 16, 8, 50
    cache = torch.randn(8, hkv, bs, 2 * d, generator=g)
    table = torch.tensor([[3, 1, 6, 2, 7, 5, 4]], dtype=torch.int32)
    q = torch.randn(1, hkv * group, d, generator=g)  # decode: one token at position seq-1
    out = torch.empty_like(q)
    pol = _policy({"policy": "streaming", "policy_params": {"sink": 3, "window": 10}})
    attended = cpu_attention(q, cache, table, [0, 1], [seq], 0.25, out,
                             patterns=pol.patterns(0, [seq], hkv, "cpu")).attended
    assert attended == hkv * 13
    k, v = gather_kv(cache, table[0], seq)  # [seq, hkv, d] fp32
    keep = list(range(3)) + list(range(seq - 10, seq))
    for h in range(hkv * group):
        kh, vh = k[keep, h // group], v[keep, h // group]
        ref = torch.softmax((q[0, h] @ kh.T) * 0.25, -1) @ vh
        torch.testing.assert_close(out[0, h], ref, atol=1e-5, rtol=1e-5)
