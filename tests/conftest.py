"""Session-wide test setup.

Triton reads TRITON_INTERPRET once, when it is first imported, so it is set here -- before any test
imports the kernels -- on machines without CUDA: every Triton kernel then runs on CPU tensors through
the interpreter when a test asks for `backend="triton"`. `backend="auto"` keeps using the torch
path on CPU, so the trainer tests are not slowed down. On a CUDA machine the kernels compile for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
