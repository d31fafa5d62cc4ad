"""Policies: registry, params validation, patterns, and the CPU path applying them."""

import pytest
import torch

from casakv_vllm.config import CasakvConfigError, load_config
from casakv_vllm.policies import available_policies, get_policy_class
from casakv_kernels.patterns import pattern_mask


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
    ({"policy": "streaming", "kv_ratio": 0.25, "kv_min": 0, "policy_params": {"sink": 8}}, 400, 92),
    ({"policy": "streaming", "kv_ratio": 0.25, "policy_params": {"sink": 8}}, 400, 120),  # kv_min 128
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
