"""Stage vLLM's own Triton paged-attention kernel for a GPU box without vLLM.

The kernel benchmark (`casakv bench kernels --vllm-kernel DIR`) times vLLM's
``unified_attention`` beside casakv's kernels, as ``vllm_triton_ms``.  The GPU
box has torch and Triton but no vLLM, so this script copies the two kernel
files, unchanged, from the vLLM installed here (the CPU build, same 0.32.x
sources) into DIR, a git-ignored folder that travels with the device call:

    DIR/vllm/v1/attention/ops/triton_unified_attention.py   (copied)
    DIR/vllm/v1/attention/ops/triton_attention_helpers.py   (copied)
    DIR/vllm/v1/kv_cache_interface.py   (the KVQuantMode enum, cut from vLLM's file)

and writes the few modules those files import from the rest of vLLM as
small stand-ins: ``vllm.envs`` (two flags), ``vllm.logger.init_logger``,
``vllm.platforms.current_platform`` (fp8 dtype and the device capability,
answered from torch) and ``vllm.triton_utils`` (``triton``/``tl``).  Nothing
of it is committed.

Usage: python scripts/stage_vllm_kernel.py [DIR]   (default: .vllm_kernel)
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

STANDINS = {
    "vllm/__init__.py": '"""Stand-in package: only what vLLM\'s Triton attention kernel imports."""\n',
    "vllm/envs.py": "VLLM_BATCH_INVARIANT = False\nVLLM_TRITON_USE_TD = None\n",
    "vllm/logger.py": "import logging\n\n\ndef init_logger(name):\n    return logging.getLogger(name)\n",
    "vllm/platforms/__init__.py": '''import torch


class _Platform:
    """The platform queries vLLM's attention kernel makes, answered from torch."""

    @staticmethod
    def fp8_dtype():
        return torch.float8_e4m3fn

    @staticmethod
    def is_device_capability_family(capability, device_id=0):
        major, minor = torch.cuda.get_device_capability(device_id)
        return (major * 10 + minor) // 10 == capability // 10

    @staticmethod
    def is_xpu():
        return False

    @staticmethod
    def is_rocm():
        return False

    @staticmethod
    def is_cuda():
        return True


current_platform = _Platform()
''',
    "vllm/triton_utils/__init__.py": '''import triton
import triton.language as tl

HAS_TRITON = True
LOG2E = 1.4426950408889634
LOGE2 = 0.6931471805599453


def use_tensor_descriptor(override=None):
    return bool(override)
''',
    "vllm/v1/__init__.py": "",
    "vllm/v1/attention/__init__.py": "",
    "vllm/v1/attention/ops/__init__.py": "",
}
COPIED = ("v1/attention/ops/triton_unified_attention.py", "v1/attention/ops/triton_attention_helpers.py")


def _enum_source(path: Path, name: str) -> str:
    """The source of class ``name`` in ``path`` (vLLM's KVQuantMode)."""
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return ast.get_source_segment(text, node)
    raise SystemExit(f"{name} not found in {path}")


def stage(dest: Path) -> Path:
    try:
        import vllm
    except ImportError:
        raise SystemExit("vLLM is not installed here (run `make setup` first)") from None
    src = Path(vllm.__file__).parent
    if dest.exists():
        shutil.rmtree(dest)
    for rel, text in STANDINS.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    for rel in COPIED:
        shutil.copyfile(src / rel, dest / "vllm" / rel)
    enum = _enum_source(src / "v1/kv_cache_interface.py", "KVQuantMode")
    (dest / "vllm/v1/kv_cache_interface.py").write_text("from enum import IntEnum\n\n\n" + enum + "\n")
    (dest / "VERSION").write_text(f"vllm {vllm.__version__} from {src}\n")
    return dest


if __name__ == "__main__":
    out = stage(Path(sys.argv[1] if len(sys.argv) > 1 else ".vllm_kernel"))
    print(f"staged vLLM's unified_attention ({(out / 'VERSION').read_text().strip()}) in {out}")
