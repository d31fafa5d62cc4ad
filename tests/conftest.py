"""Fixtures shared by the test folders: the builder/impl harness (``casakv_vllm.tools.harness``)."""

import pytest

from casakv_vllm.tools.harness import Batch, Harness  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    pytest.importorskip("vllm")
    from casakv_vllm.integration.plugin import register

    register()
    return Harness(tmp_path_factory.mktemp("models"))
