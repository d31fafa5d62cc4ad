"""The docs site builds with `mkdocs build --strict` and has the pages the project promises."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from deploy_helpers import CHART, REPO, venv_tool

PAGES = {"Install": "install.md", "Serve": "serve.md", "Configuration": "configuration.md",
         "Policies": "policies.md", "Deployment (Kubernetes)": "deployment.md", "Metrics and dashboard": "metrics.md",
         "Architecture": "architecture.md"}


def nav_files(nav) -> dict[str, str]:
    out = {}
    for entry in nav:
        for title, target in entry.items():
            out.update(nav_files(target) if isinstance(target, list) else {title: target})
    return out


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([venv_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in PAGES.values():
        assert (site / page.removesuffix(".md") / "index.html").is_file(), page
    deployment = (site / "deployment/index.html").read_text()
    # the values file shown is the one the tests render (included from the chart, not copied)
    assert "llm-weights" in deployment and "existingClaim" in deployment
    assert (site / "assets/dashboard-preview.png").is_file()


def test_nav_lists_the_pages():
    nav = nav_files(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    for title, page in PAGES.items():
        assert nav.get(title) == page and (REPO / "docs" / page).is_file(), title
    assert any(p.startswith("benchmarks") for p in nav.values())


def test_deployment_page_matches_the_chart():
    """Every values key the deployment page names exists in the chart's values."""
    import re

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    page = (REPO / "docs/deployment.md").read_text()
    keys = set(re.findall(r"`((?:model|vllm|autoscaling|serviceMonitor|dashboard|image|gpu|probes|ingress|"
                          r"podDisruptionBudget|networkPolicy|cpu)\.[A-Za-z.]+)", page))
    assert len(keys) > 15
    for key in keys:
        node = values
        for part in key.split("."):
            if node == {}:  # a free-form map (labels, annotations): any key
                break
            assert isinstance(node, dict) and part in node, f"deployment.md names `{key}`, not in values.yaml"
            node = node[part]


def test_deployment_page_walkthrough_one_gpu():
    """Follow the page's one-GPU steps: its `helm install` with the values file it shows, and the
    objects its kubectl commands name, rendered by Helm and valid for Kubernetes."""
    import re

    from deploy_helpers import need, objects

    helm, kv = need("helm_python"), need("kubernetes_validate")
    page = (REPO / "docs/deployment.md").read_text()
    section = page.split("## 3. Install: one GPU", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r'--8<-- "([^"]+)"', section).group(1)  # the values file the page shows
    install = re.search(r"helm install (\S+) (\S+) -n (\S+) -f (\S+)", section)
    release, chart, namespace = install.group(1), install.group(2), install.group(3)
    values = yaml.safe_load((REPO / shown).read_text())
    with helm.Chart.load(str(REPO / chart)) as loaded:
        loaded.validate_schema(values)
        rendered = loaded.render(values, name=release, namespace=namespace, is_install=True)
    report = helm.lint(str(REPO / chart), values, strict=True, namespace=namespace)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"]
    objs = objects(rendered)
    for obj in objs:
        kv.validate(obj, "1.37.0", strict=True)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for kind, name in re.findall(r"kubectl -n \S+ (?:rollout status|port-forward) (deployment|svc)/(\S+)", section):
        assert ({"deployment": "Deployment", "svc": "Service"}[kind], name) in names, (kind, name)
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} \
        <= {k for k, _ in names}
    dep = [o for o in objs if o["kind"] == "Deployment"][0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--attention-backend=casakv" in c["args"]
    notes = rendered[f"{Path(chart).name}/templates/NOTES.txt"]
    assert f"deployment/{dep['metadata']['name']}" in notes and f"-n {namespace}" in notes
