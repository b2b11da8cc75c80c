"""Test-wide settings: Triton kernels run on CPU tensors in interpreter mode (no GPU here)."""

import os

# must be set before anything imports triton (importing some transformers classes does)
os.environ.setdefault("TRITON_INTERPRET", "1")
