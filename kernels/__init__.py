"""Triton kernels that fuse BatchNorm-ReLU(-conv) and recompute activations in backward.

Activations: ReLU (default), leaky ReLU and identity (``activation=``, ``activation_param=`` on every entry
point); :class:`InPlaceABN` / :class:`ABN` / :class:`InPlaceABNSync` are drop-ins for the inplace_abn package.

Importing this package without a CUDA device sets ``TRITON_INTERPRET=1`` first, so the same kernels run
(slowly, for tests) on CPU tensors. Backends: ``"triton"`` (compiled on CUDA, interpreted on CPU),
``"torch"`` (the same recompute autograd structure in plain torch ops: the fast CPU path) and ``"auto"``.
This package imports nothing from ``widedeep``.
"""

from . import _runtime  # noqa: F401 (must run before any @triton.jit definition)
from ._runtime import BACKENDS, HAS_CUDA, HAS_TRITON, INTERPRET, resolve_backend, set_default_backend
from .api import bn_relu, bn_relu_conv
from .bn_relu import ACTIVATIONS, BNParams, bn_params, bn_relu_backward, bn_relu_forward
from .bn_stats import channel_stats
from .fuse import FusedSequential, fuse_bn_relu_conv, unfuse
from .modules import ABN, BNReLU, BNReLUConv2d, InPlaceABN, InPlaceABNSync

__all__ = [
    "ABN",
    "ACTIVATIONS",
    "InPlaceABN",
    "InPlaceABNSync",
    "BACKENDS",
    "HAS_CUDA",
    "HAS_TRITON",
    "INTERPRET",
    "BNParams",
    "BNReLU",
    "BNReLUConv2d",
    "FusedSequential",
    "bn_params",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_conv",
    "bn_relu_forward",
    "channel_stats",
    "fuse_bn_relu_conv",
    "resolve_backend",
    "set_default_backend",
    "unfuse",
]
