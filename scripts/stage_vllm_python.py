"""Stage vLLM's pure-Python layer for a GPU box without vLLM (the device tool's H200).

The GPU tests drive casakv's real metadata builder and impl with hand-built
vLLM metadata (``tests/conftest.py``).  They need vLLM's Python modules
(config, attention backend interface, KV-cache specs, logits-processor
interface) but none of its compiled ops.  This script packs the ``vllm/``
tree of the vLLM installed here (the CPU build, same 0.32.x sources) without
its shared libraries, and downloads the cp312 wheels it imports that the GPU
image lacks, into DIR (git-ignored, carried with the device call):

    DIR/vllm-python.tar.xz    DIR/wheels/*.whl

On the GPU box (``scripts/gpu-suite.sh`` does this when DIR exists):
``pip install --no-index --no-deps --target /tmp/site DIR/wheels/*.whl``,
``tar -xJf DIR/vllm-python.tar.xz -C /tmp/site``, ``PYTHONPATH=/tmp/site``.
vLLM then runs under its "unspecified" platform.  Nothing of it is committed.

Usage: python scripts/stage_vllm_python.py [DIR]   (default: .vllm_py)
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import tarfile
from pathlib import Path

WHEELS = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "pyzmq", "msgspec", "cachetools",
          "blake3", "cbor2", "pybase64", "ijson", "setproctitle", "partial-json-parser", "openai", "jiter",
          "distro", "fastapi", "starlette", "llguidance", "xgrammar", "gguf", "openai-harmony", "httpx2", "httpcore2",
          "truststore", "sniffio", "dill", "googleapis-common-protos", "apache-tvm-ffi"]
# (the GPU image's packages are listed in the device tool's KINDS.md; these are what vLLM's config,
# attention, sampling and logits-processor modules, and its model inspection (a subprocess that imports
# the model's module), import beyond them; found by running tests/conftest.py's Harness in a venv that holds
# only the image's packages and these)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else ".vllm_py")
    (out / "wheels").mkdir(parents=True, exist_ok=True)
    import vllm

    root = Path(vllm.__file__).parent
    with tarfile.open(out / "vllm-python.tar.xz", "w:xz") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".json", ".jinja", ".txt") and "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(root.parent)))
        # no distribution metadata on purpose: without it vLLM picks its "unspecified" platform (with
        # the CPU build's "+cpu" version it would pick the CPU platform, with another the CUDA one,
        # whose compiled ops the CPU build lacks)
    for name in WHEELS:
        try:
            pin = f"{name}=={md.version(name)}"
        except md.PackageNotFoundError:
            pin = name   # provided here under another distribution name (openai_harmony by oss-harmony)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(out / "wheels"),
               pin] + [a for p in PLATFORMS for a in ("--platform", p)] + ["--platform", "any"]
        if subprocess.run(cmd).returncode != 0:
            print(f"stage_vllm_python: no cp312 wheel for {pin}", file=sys.stderr)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"staged {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
