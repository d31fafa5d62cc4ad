"""Fixtures of the deployment checks (helpers in deploy_helpers.py, importable from the tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import VALUES_FILES, load_values, render  # noqa: E402


@pytest.fixture(scope="session")
def renders() -> dict[str, tuple[dict, dict[str, str]]]:
    """values-file stem -> (values, render), every file under the chart's ci/ plus the defaults."""
    out = {"defaults": ({}, render({}))}
    for path in VALUES_FILES:
        values = load_values(path)
        out[path.stem.removesuffix("-values")] = (values, render(values))
    return out
