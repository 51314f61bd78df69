import os

import pytest
import torch

# Kernels must see TRITON_INTERPRET before any @triton.jit definition: import the package first.
import kernels  # noqa: F401

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Small synthetic datasets in all four layouts: ``synthetic_root(name) -> Path``."""
    from data_pipes.synthetic import write_synthetic

    base = tmp_path_factory.mktemp("synthetic")
    made = {}

    def get(dataset: str):
        if dataset not in made:
            made[dataset] = write_synthetic(dataset, base / dataset, num_train=10, num_val=5, size=(48, 80),
                                            num_classes={"ilsvrc": 4, "ade20k": 8}.get(dataset))
        return made[dataset]

    return get
