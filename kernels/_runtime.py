"""Backend choice for the kernels: compiled Triton on CUDA, the Triton interpreter on CPU, or plain torch.

Imported first by :mod:`kernels`: without a CUDA device it sets ``TRITON_INTERPRET=1`` *before* any
``@triton.jit`` function is defined (Triton reads the variable at decoration time; setting it later leaves
kernels that fail with "0 active drivers").
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is Linux-only; the torch backend still works
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
_default = os.environ.get("WIDEDEEP_KERNEL_BACKEND", "auto")


def set_default_backend(name: str) -> None:
    """Make ``backend="auto"`` mean ``name`` process-wide (also settable as WIDEDEEP_KERNEL_BACKEND)."""
    global _default
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _default = name


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for tensor ``x``.

    ``auto``: compiled Triton for CUDA tensors; the torch recompute path for CPU tensors (the interpreter is
    for tests, not speed). ``triton`` on a CPU tensor needs the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _default
    if backend == "auto":
        return "triton" if (x.is_cuda and HAS_TRITON and not INTERPRET) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (Linux); use backend='torch'")
        if not x.is_cuda and not INTERPRET:
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before `kernels` "
                "is imported; use backend='torch' for the CPU recompute path"
            )
    return backend


# Tests set this to a GPU's program count (e.g. 4 x 132 for an H100) so that the interpreter runs the multi-block
# merges every real GPU layer takes; None: derived from the device.
PROGRAMS_HINT: int | None = None


def num_programs_hint(x: torch.Tensor) -> int:
    """How many programs a reduction grid should aim for: a few waves on a GPU, a handful when interpreted
    (:data:`PROGRAMS_HINT` overrides both)."""
    if PROGRAMS_HINT is not None:
        return PROGRAMS_HINT
    if x.is_cuda and not INTERPRET:
        return 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 4
