"""values.schema.json and docs/configuration.md follow CasakvConfig; the schema refuses what the server refuses."""

from __future__ import annotations

import json

import pytest

from deploy_helpers import CHART, REPO, need

from casakv_vllm.config import CasakvConfigError, load_config
from casakv_vllm.tools import schema as gen


def test_generated_files_are_up_to_date():
    stale = gen.stale_files(REPO)
    assert not stale, f"{', '.join(map(str, stale))} out of date with CasakvConfig: run `{gen.COMMAND}`"


def test_check_mode_names_the_command(tmp_path, capsys):
    for rel in (gen.BASE_SCHEMA, gen.CHART_SCHEMA, gen.CONFIG_DOC):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    assert gen.main(["--check", "--repo", str(tmp_path)]) == 0
    (tmp_path / gen.CONFIG_DOC).write_text("# edited by hand\n")
    assert gen.main(["--check", "--repo", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and gen.COMMAND in err and "configuration.md" in err
    assert gen.main(["--repo", str(tmp_path)]) == 0 and gen.main(["--check", "--repo", str(tmp_path)]) == 0


def test_every_config_field_and_policy_is_in_the_schema():
    from casakv_vllm.config import CasakvConfig
    from casakv_vllm.policies import available_policies

    block = json.loads((CHART / "values.schema.json").read_text())["properties"]["casakv"]
    assert set(block["properties"]) == set(CasakvConfig.model_fields)
    assert block["properties"]["policy"]["enum"] == sorted(available_policies())
    assert block["additionalProperties"] is False
    doc = (REPO / gen.CONFIG_DOC).read_text()
    assert all(f"`{name}`" in doc for name in CasakvConfig.model_fields)
    assert all(f"### `{name}`" in doc for name in available_policies())


# (casakv block, does CasakvConfig accept it?)
CASES = [
    ({}, True),
    ({"policy": "snapkv", "kv_ratio": 0.25}, True),
    ({"policy": "snapkv", "kv_budget": 512, "policy_params": {"window": 16, "kernel": 5}}, True),
    ({"policy": "streaming", "policy_params": {"sink": 4, "window": 256, "scope": "decode"}}, True),
    ({"policy": "pyramidkv", "kv_ratio": 0.5, "prefill_compression": True}, True),
    ({"policy": "h2o", "kv_budget": 256, "policy_params": {"recent_ratio": 0.5}}, True),
    ({"policy": "dense", "chunk_size": None, "metrics": False}, True),
    ({"kv_ratio": 1.5}, False),
    ({"kv_ratio": 0}, False),
    ({"kv_budget": 0}, False),
    ({"kv_budget": 512, "kv_ratio": 0.5}, False),
    ({"chunk_size": 8}, False),
    ({"policy": "no-such-policy"}, False),
    ({"polcy": "snapkv"}, False),
    ({"policy": "snapkv", "policy_params": {"windw": 16}}, False),
    ({"policy": "snapkv", "policy_params": {"window": 1000}}, False),
    ({"policy": "streaming", "policy_params": {"scope": "sometimes"}}, False),
    ({"policy_params": {"window": 3}}, False),  # dense takes no parameters
    ({"prefill_compression": "yes"}, False),
]


@pytest.mark.parametrize("block,accepted", CASES, ids=[json.dumps(c) for c, _ in CASES])
def test_chart_schema_agrees_with_casakv_config(block, accepted):
    helm = need("helm_python")
    try:
        load_config({"casakv": block}, environ={})
        server = True
    except CasakvConfigError:
        server = False
    assert server is accepted, "the case table is wrong"
    with helm.Chart.load(str(CHART)) as chart:
        if accepted:
            chart.validate_schema({"casakv": block})
        else:
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema({"casakv": block})
