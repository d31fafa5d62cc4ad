"""Kernel tests run on the GPU when there is one, else through Triton's
CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
