"""The Helm chart, linted and rendered by Helm's own Go code, every manifest checked against Kubernetes' schemas."""

from __future__ import annotations

import json

import pytest

from deploy_helpers import CHART, NAMESPACE, VALUES_FILES, kind_of, load_values, need, objects, render

# the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate ships
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# CRD kinds: kubernetes-validate ships only the built-in schemas; these get the structural checks below
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
CASES = ["defaults", *(p.stem.removesuffix("-values") for p in VALUES_FILES)]


def test_values_files_cover_the_issue():
    assert {"cpu", "gpu", "tp2", "autoscaling"} <= set(CASES), CASES


@pytest.mark.parametrize("path", VALUES_FILES, ids=lambda p: p.stem)
def test_helm_lint_strict(path):
    helm = need("helm_python")
    report = helm.lint(str(CHART), load_values(path), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report["errors"]
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems, problems


@pytest.mark.parametrize("case", CASES)
def test_manifests_match_kubernetes_schemas(renders, case):
    kv = need("kubernetes_validate")
    objs = objects(renders[case][1])
    assert objs
    checked = 0
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kv.validate(obj, version, strict=True)  # strict: unknown fields are errors
        checked += 1
    assert checked >= 5
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), names
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in objs)


def test_kubernetes_validate_catches_a_broken_manifest(renders):
    kv = need("kubernetes_validate")
    dep = json.loads(json.dumps(kind_of(objects(renders["gpu"][1]), "Deployment")[0]))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = {"bad": 1}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, KUBE_VERSIONS[-1], strict=True)
    dep = json.loads(json.dumps(kind_of(objects(renders["gpu"][1]), "Deployment")[0]))
    dep["spec"]["template"]["spec"]["containers"][0]["unknownField"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, KUBE_VERSIONS[-1], strict=True)


def _server(objs):
    dep = kind_of(objs, "Deployment")[0]
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def _flag(args, name):
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@pytest.mark.parametrize("case", CASES)
def test_server_container(renders, case):
    values, rendered = renders[case]
    objs = objects(rendered)
    dep, c = _server(objs)
    assert c["command"] == ["vllm", "serve"]
    assert _flag(c["args"], "--attention-backend") == "casakv"
    casakv = json.loads(_flag(c["args"], "--additional-config"))
    assert casakv == {"casakv": values.get("casakv", {"policy": "dense"})}
    from casakv_vllm.config import load_config

    load_config(casakv, environ={})  # the server accepts what the chart passes
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/models", "/cache", "/tmp", "/dev/shm"} <= mounts
    svc = kind_of(objs, "Service")[0]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    notes = rendered["casakv-vllm/templates/NOTES.txt"]
    assert f"deployment/{dep['metadata']['name']}" in notes
    assert ("https://llm.example.com/v1/models" in notes) if case == "autoscaling" else ("port-forward" in notes)


@pytest.mark.parametrize("case,gpus,tp", [("defaults", 1, 1), ("gpu", 1, 1), ("tp2", 2, 2), ("cpu", 0, 1)])
def test_gpus_follow_tensor_parallelism(renders, case, gpus, tp):
    dep, c = _server(objects(renders[case][1]))
    assert _flag(c["args"], "--tensor-parallel-size") == str(tp)
    assert c["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert ("VLLM_CPU_KVCACHE_SPACE" in env) == (case == "cpu")
    assert ("--gpu-memory-utilization=0.9" in c["args"]) == (case != "cpu")


def test_model_sources(renders):
    dep, c = _server(objects(renders["gpu"][1]))  # path on an existing PVC: no init container
    pod = dep["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert c["args"][0] == "/models/Llama-3.1-8B-Instruct"
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "llm-weights"}} in pod["volumes"]
    objs = objects(renders["tp2"][1])  # hub id into a PVC the chart creates, gated model token as a file
    dep, c = _server(objs)
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["CASAKV_MODEL_ID"] == "Qwen/Qwen2.5-14B-Instruct"
    assert env["CASAKV_MODEL_DIR"] == c["args"][0] == "/models/hub/Qwen--Qwen2.5-14B-Instruct"
    assert env["HF_TOKEN_PATH"] == "/var/run/secrets/huggingface/token"
    assert "snapshot_download" in init["command"][-1]
    pvc = kind_of(objs, "PersistentVolumeClaim")[0]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "80Gi"
    assert "@sha256:" in c["image"]
    dep, c = _server(objects(renders["cpu"][1]))  # the CPU image's demo model
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][:2] == ["casakv", "demo-model"]
    assert c["args"][0] == "/models/smollm2-135m-instruct"


def test_optional_objects(renders):
    kinds = {case: {o["kind"] for o in objects(r)} for case, (_, r) in renders.items()}
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} \
        <= kinds["defaults"]
    assert not {"Ingress", "ServiceMonitor", "HorizontalPodAutoscaler", "ScaledObject"} & kinds["defaults"]
    assert {"Ingress", "ServiceMonitor", "HorizontalPodAutoscaler"} <= kinds["autoscaling"]
    assert "ScaledObject" in kinds["keda"] and "HorizontalPodAutoscaler" not in kinds["keda"]


def test_autoscaling_objects(renders):
    objs = objects(renders["autoscaling"][1])
    dep, _ = _server(objs)
    assert "replicas" not in dep["spec"]  # the HPA owns the replica count
    hpa = kind_of(objs, "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]}
    assert metrics == {"vllm_num_requests_waiting": "5", "vllm_kv_cache_usage_perc": "800m"}
    sm = kind_of(objs, "ServiceMonitor")[0]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and sm["spec"]["endpoints"][0]["port"] == "http"
    assert sm["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    keda = kind_of(objects(renders["keda"][1]), "ScaledObject")[0]
    queries = {t["name"]: t["metadata"]["query"] for t in keda["spec"]["triggers"]}
    assert queries["requests-waiting"].startswith("sum(vllm:num_requests_waiting{")
    assert queries["kv-cache-usage"].startswith("max(vllm:kv_cache_usage_perc{")
    assert keda["spec"]["scaleTargetRef"]["name"] == "demo-casakv-vllm"
    assert all(t["type"] == "prometheus" and t["metadata"]["serverAddress"].startswith("http")
               for t in keda["spec"]["triggers"])


def test_dashboard_configmap_carries_the_dashboard(renders):
    cm = [o for o in objects(renders["defaults"][1]) if o["kind"] == "ConfigMap"][0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["casakv-vllm.json"])
    assert shipped == json.loads((CHART / "dashboards/casakv-vllm.json").read_text())


def test_renders_fail_on_bad_values():
    helm = need("helm_python")
    for bad in ({"vllm": {"tensorParallelSize": 0}}, {"autoscaling": {"engine": "cron"}},
                {"image": {"digest": "latest"}}, {"unknownKey": 1}):
        with pytest.raises(helm.HelmValuesError):
            render(bad)
