import os

import pytest
import torch

# Kernels must see TRITON_INTERPRET before any @triton.jit definition: import the package first.
import kernels  # noqa: F401

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
