"""Helpers of the deployment checks: the chart, its values files, and their renders.

The tools are real and installed by `make venv` (requirements-deploy.txt,
checkov in `<venv>-checkov`): a missing one fails with the command that
installs it rather than skipping.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy/helm/casakv-vllm"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "demo", "casakv"
INSTALL_HINT = "deployment tools missing: run `make venv` (scripts/setup-cpu-venv.sh installs requirements-deploy.txt)"


def need(module: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"{module}: {INSTALL_HINT}")


def venv_tool(name: str) -> str:
    """A command installed next to this Python (the project's venv), or on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name}: {INSTALL_HINT}")
    return found


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict) -> dict[str, str]:
    """Helm's own renderer (Go SDK): template path -> manifest text."""
    helm = need("helm_python")
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    """The Kubernetes objects of a render (NOTES.txt left out)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def kind_of(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]
