"""Kernel tests run on the GPU when there is one, else through Triton's
CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the shared case builders (decode_cases.py) import as top-level modules
# under --import-mode=importlib
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
