"""CasakvConfig: sources, precedence and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from casakv_vllm.config import CasakvConfig, CasakvConfigError, load_config


def test_defaults():
    cfg = load_config(None, environ={})
    assert cfg == CasakvConfig()
    assert cfg.policy == "dense" and cfg.kv_budget is None and cfg.reprofile_interval == 16


def test_from_additional_config():
    cfg = load_config({"casakv": {"kv_budget": 512, "chunk_size": 128, "recall_threshold": 0.8}}, environ={})
    assert (cfg.kv_budget, cfg.chunk_size, cfg.recall_threshold) == (512, 128, 0.8)


def test_other_additional_config_keys_ignored():
    assert load_config({"something_else": 1}, environ={}) == CasakvConfig()


def test_file_then_cli_precedence(tmp_path):
    f = tmp_path / "casakv.json"
    f.write_text(json.dumps({"kv_budget": 256, "reprofile_interval": 8}))
    cfg = load_config({"casakv": {"kv_budget": 1024}}, environ={"CASAKV_CONFIG": str(f)})
    assert cfg.kv_budget == 1024 and cfg.reprofile_interval == 8


def test_yaml_file(tmp_path):
    f = tmp_path / "casakv.yaml"
    f.write_text("casakv:\n  kv_ratio: 0.25\n  chunk_size: 32\n")
    cfg = load_config(None, environ={"CASAKV_CONFIG": str(f)})
    assert cfg.kv_ratio == 0.25 and cfg.chunk_size == 32


def test_predictor_local_path(tmp_path):
    cfg = load_config({"casakv": {"predictor": str(tmp_path)}}, environ={})
    assert cfg.predictor == str(tmp_path)
    assert load_config({"casakv": {"predictor": "casakv/predictor-v1"}}, environ={}).predictor == "casakv/predictor-v1"


BAD = [
    ({"policy": "sparse-magic"}, "policy", "dense"),
    ({"recall_threshold": 1.5}, "recall_threshold", "1.5"),
    ({"kv_budget": -4}, "kv_budget", "-4"),
    ({"chunk_size": 48}, "chunk_size", "power of two"),
    ({"reprofile_interval": 0}, "reprofile_interval", "0"),
    ({"kv_ratio": 2.0}, "kv_ratio", "2.0"),
    ({"kv_budget": 128, "kv_ratio": 0.5}, "kv_budget or kv_ratio", "not both"),
    ({"budget": 128}, "budget", "allowed fields"),
    ({"predictor": "/no/such/checkpoint"}, "predictor", "/no/such/checkpoint"),
    ({"policy_params": {"window": 4}}, "policy_params", "window"),
    ({"kv_budget": "lots"}, "kv_budget", "lots"),
]


@pytest.mark.parametrize("value,field,shown", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_values_one_line(value, field, shown):
    with pytest.raises(CasakvConfigError) as info:
        load_config({"casakv": value}, environ={})
    msg = str(info.value)
    assert "\n" not in msg
    assert field in msg and shown in msg, msg


def test_casakv_key_must_be_object():
    with pytest.raises(CasakvConfigError, match="must be a JSON object"):
        load_config({"casakv": [1, 2]}, environ={})


def test_bad_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text("{not json")
    with pytest.raises(CasakvConfigError, match="cannot parse") as info:
        load_config(None, environ={"CASAKV_CONFIG": str(f)})
    assert "\n" not in str(info.value)
    with pytest.raises(CasakvConfigError, match="not a readable file"):
        load_config(None, environ={"CASAKV_CONFIG": str(tmp_path / "missing.yaml")})


def test_check_config_cli_one_line_no_traceback():
    casakv = Path(sys.executable).with_name("casakv")
    out = subprocess.run([casakv, "check-config", '{"recall_threshold": 7}'], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "recall_threshold=7" in out.stderr
    ok = subprocess.run([casakv, "check-config", '{"kv_budget": 64}'], capture_output=True, text=True, check=True)
    assert json.loads(ok.stdout)["kv_budget"] == 64
