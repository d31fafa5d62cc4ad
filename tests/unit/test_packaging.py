"""The installed package: layout, entry points, console script."""

import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_triton_kernels_not_top_level():
    """OpenAI's `triton_kernels` must never be shadowed by our folder."""
    spec = importlib.util.find_spec("triton_kernels")
    if spec is not None:
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
        assert REPO not in origin.parents, f"top-level triton_kernels resolves into the repo: {origin}"


def test_kernels_package_folder_is_its_import_path():
    import casakv_kernels as tk

    assert Path(tk.__file__).resolve().parent == REPO / "triton_kernels" / "casakv_kernels"


def test_triton_kernels_not_top_level_from_repo_root():
    """Even a process started in the repo root (python -P, as vLLM's CLI is) sees no shadow."""
    code = "import importlib.util as u; s = u.find_spec('triton_kernels'); print(s.origin if s else 'none')"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert str(REPO) not in out.stdout, out.stdout


def test_vllm_plugin_entry_point():
    eps = md.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "casakv"]
    assert len(ours) == 1 and ours[0].value == "casakv_vllm.integration.plugin:register"


def test_cli_help_lists_every_subcommand():
    from casakv_vllm.tools.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    out = subprocess.run([Path(sys.executable).with_name("casakv"), "--help"], capture_output=True, text=True, check=True)
    assert subcommands, "no subcommands registered"
    for name in subcommands:
        assert name in out.stdout, f"{name} missing from casakv --help"


def test_pure_python_install_without_cuda():
    """On a CPU-only torch the CUDA extension is not built and not needed."""
    import torch

    assert torch.version.cuda is None
    assert importlib.util.find_spec("casakv_vllm._C") is None
    import casakv_vllm.integration.impl  # noqa: F401  (imports without the extension)
    import casakv_vllm.ops.custom  # noqa: F401


def test_every_subpackage_is_listed_for_installation():
    """A package folder missing from pyproject's list installs fine in editable mode and breaks in a wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "casakv_vllm").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject packages: {sorted(found - listed)}"
