"""Test-wide settings: Triton kernels run on CPU tensors in interpreter mode (no GPU here)."""

import os

# must be set before anything imports triton (importing some transformers classes does)
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread; restored after.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
