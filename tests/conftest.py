import os

import pytest
import torch

# Kernels must see TRITON_INTERPRET before any @triton.jit definition: import the package first.
import kernels  # noqa: F401

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


HAS_CUDA = torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA; on a CUDA machine every test taking ``device`` is also a ``gpu`` test, so
    ``python -m pytest -q -m gpu`` runs the compiled kernels (tryfirst: before ``-m`` deselects)."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if HAS_CUDA and "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)
        elif not HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """ "cuda" (compiled kernels, no interpreter) when a GPU is present, else "cpu" (the Triton interpreter).

    On CUDA the torch references must be true fp32: cuDNN convolutions default to TF32 (10-bit mantissa), which
    alone differs from an IEEE fp32 kernel by ~1e-3 relative, far above the fp32 tolerances."""
    if HAS_CUDA:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return "cuda" if HAS_CUDA else "cpu"


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
            made[dataset] = write_synthetic(
                dataset,
                base / dataset,
                num_train=10,
                num_val=5,
                size=(48, 80),
                num_classes={"ilsvrc": 4, "ade20k": 8}.get(dataset),
            )
        return made[dataset]

    return get
