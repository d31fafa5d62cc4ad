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
    assert cfg.policy == "dense" and cfg.kv_budget is None and cfg.kv_ratio is None and cfg.metrics


def test_from_additional_config():
    cfg = load_config({"casakv": {"policy": "snapkv", "kv_budget": 512, "policy_params": {"window": 16}}}, environ={})
    assert (cfg.policy, cfg.kv_budget, cfg.policy_params) == ("snapkv", 512, {"window": 16})


def test_other_additional_config_keys_ignored():
    assert load_config({"something_else": 1}, environ={}) == CasakvConfig()


def test_file_then_cli_precedence(tmp_path):
    f = tmp_path / "casakv.json"
    f.write_text(json.dumps({"kv_budget": 256, "policy": "snapkv", "metrics": False}))
    cfg = load_config({"casakv": {"kv_budget": 1024}}, environ={"CASAKV_CONFIG": str(f)})
    assert cfg.kv_budget == 1024 and cfg.policy == "snapkv" and not cfg.metrics


def test_yaml_file(tmp_path):
    f = tmp_path / "casakv.yaml"
    f.write_text("casakv:\n  kv_ratio: 0.25\n  policy: h2o\n")
    cfg = load_config(None, environ={"CASAKV_CONFIG": str(f)})
    assert cfg.kv_ratio == 0.25 and cfg.policy == "h2o"


@pytest.mark.parametrize("field", ["reprofile_interval", "recall_threshold", "predictor"])
def test_fields_nothing_reads_are_refused(field):
    """Settings for work that has not landed (re-profiling, the predictor)
    are unknown fields until something reads them."""
    with pytest.raises(CasakvConfigError, match=f"unknown field '{field}'"):
        load_config({"casakv": {field: 1}}, environ={})


BAD = [
    ({"policy": "sparse-magic"}, "policy", "dense"),
    ({"kv_budget": -4}, "kv_budget", "-4"),
    ({"kv_ratio": 2.0}, "kv_ratio", "2.0"),
    ({"kv_budget": 128, "kv_ratio": 0.5}, "kv_budget or kv_ratio", "not both"),
    ({"budget": 128}, "budget", "allowed fields"),
    ({"metrics": "often"}, "metrics", "often"),
    ({"policy_params": {"window": 4}}, "policy_params", "window"),
    ({"kv_budget": "lots"}, "kv_budget", "lots"),
    ({"chunk_size": 8}, "chunk_size", "8"),
    ({"policy": "h2o", "kv_budget": 64, "prefill_compression": True}, "casakv", "selects its tokens once"),
    ({"policy": "snapkv", "kv_budget": 64, "prefill_compression": True, "chunk_size": None}, "casakv",
     "set chunk_size"),
]


def test_prefill_compression_per_request():
    from casakv_vllm.requests.params import check_request

    base = load_config({"casakv": {"policy": "snapkv", "kv_ratio": 0.25, "prefill_compression": True}}, environ={})
    assert check_request(base, {"casakv_kv_ratio": 0.5}, "cpu").prefill_compression  # kept with the policy
    assert not check_request(base, {"casakv_policy": "dense"}, "cpu").prefill_compression  # another policy: off
    dense = load_config({}, environ={})
    cfg = check_request(dense, {"casakv_policy": "snapkv", "casakv_kv_budget": 64,
                                "casakv_prefill_compression": True}, "cuda")
    assert cfg.prefill_compression and cfg.chunk_size == 256
    with pytest.raises(ValueError, match="selects its tokens once"):
        check_request(dense, {"casakv_policy": "h2o", "casakv_kv_budget": 64, "casakv_prefill_compression": True},
                      "cpu")


def test_chunk_size_per_request():
    from casakv_vllm.requests.params import check_request

    base = load_config({"casakv": {"policy": "h2o", "kv_budget": 64}}, environ={})
    assert base.chunk_size == 256
    assert check_request(base, {"casakv_chunk_size": 32}, "cpu").chunk_size == 32
    with pytest.raises(ValueError, match="chunk_size=4"):
        check_request(base, {"casakv_chunk_size": 4}, "cpu")


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
    out = subprocess.run([casakv, "check-config", '{"kv_ratio": 7}'], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "kv_ratio=7" in out.stderr
    ok = subprocess.run([casakv, "check-config", '{"kv_budget": 64}'], capture_output=True, text=True, check=True)
    assert json.loads(ok.stdout)["kv_budget"] == 64
