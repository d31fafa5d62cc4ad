"""The docs site builds with `mkdocs build --strict` and has the pages the project promises."""

from __future__ import annotations

import subprocess

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
