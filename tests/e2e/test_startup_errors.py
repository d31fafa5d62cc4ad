"""A bad casakv setting stops `vllm serve` at start-up with one line, no traceback."""

import json
import os
import subprocess

import pytest

from casakv_vllm.tools.serving import cpu_env, free_port, vllm_executable

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("bad,expected", [
    ({"kv_ratio": 2}, "kv_ratio=2"),
    ({"policy": "snapkv"}, "needs kv_budget or kv_ratio"),
    ({"policy": "nope"}, 'policy="nope"'),
])
def test_bad_additional_config_fails_fast(demo_model, bad, expected):
    cmd = [vllm_executable(), "serve", demo_model, "--attention-backend", "casakv", "--port", str(free_port()),
           "--host", "127.0.0.1", "--additional-config", json.dumps({"casakv": bad})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **cpu_env()})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    errors = [ln for ln in (out.stderr + out.stdout).splitlines() if "casakv config error" in ln]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-3000:]
