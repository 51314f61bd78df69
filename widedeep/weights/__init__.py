"""Weights in every format users have: ademxapp ``.params``, psa ``.pth``, safetensors, and the Mapillary
InPlace-ABN / NVIDIA ``.pth.tar`` checkpoints (:mod:`.lineages`).

``read_state_dict`` turns any of them into our state_dict keys (``read_weights`` also returns the file's
metadata, key layout, what was skipped and md5 status); ``load_weights`` checks names and shapes against a model
and copies;
``save_weights`` writes ``.params`` / ``.safetensors`` / ``.pth`` atomically; ``pool_style_of`` decides a
Model A's max-pool style from a file's content (metadata, or the released file's md5), never its name.

This file is only the package's face: the code lives in modules that import one way, each below the next
(none imports this file or :mod:`widedeep.models`; the table they share with the model is :mod:`widedeep.arch`)::

    errors, mapping, released       leaves: exceptions; ademxapp names <-> our keys; released md5 sums
    mxnet_params                    .params reader/writer                 (errors)
    lineages                        checkpoint containers, Mapillary keys (errors, mapping, widedeep.arch)
    read                            WeightsFile, readers, BN conventions  (the above)
    pool_style                      pool style from a file's content     (read, released)
    load                            load_weights into a model            (read, lineages, mapping, widedeep.arch)
    save                            save_weights, to_ademxapp            (read, pool_style, mapping, mxnet_params)
"""

from __future__ import annotations

from widedeep.fileio import atomic_open, atomic_write_bytes  # noqa: F401 (importable from here, as always)

from .errors import WeightsFormatError, WeightsMismatchError
from .lineages import (  # noqa: F401 (the package's names as before the split)
    CONVENTIONS,
    INPLACE_ABN_EPS,
    MAPILLARY_LAYOUTS,
    PLAIN_LAYOUTS,
    check_convention,
    inplace_abn_gammas,
    state_from_checkpoint,
)
from .load import CLASSIFIER_PREFIXES, HEAD_PREFIXES, LoadReport, load_weights  # noqa: F401
from .mapping import (  # noqa: F401
    UnknownNameError,
    ademxapp_to_key,
    is_segmentation_file,
    key_to_ademxapp,
    num_classes_of,
)
from .mxnet_params import ParamsFormatError, read_params, write_params
from .pool_style import POOL_STYLES, pool_style_of  # noqa: F401
from .read import WeightsFile, checked_dtypes, read_state_dict, read_weights, with_convention  # noqa: F401
from .released import (  # noqa: F401
    RELEASED_MD5,
    RELEASED_MODEL_A,
    ChecksumError,
    check_released,
    is_released_model_a,
    verify_released,
)
from .save import save_weights, to_ademxapp

__all__ = [
    "ChecksumError",
    "ParamsFormatError",
    "WeightsFormatError",
    "WeightsMismatchError",
    "LoadReport",
    "WeightsFile",
    "RELEASED_MD5",
    "read_params",
    "write_params",
    "read_weights",
    "read_state_dict",
    "load_weights",
    "save_weights",
    "to_ademxapp",
    "num_classes_of",
    "pool_style_of",
    "verify_released",
    "with_convention",
    "CONVENTIONS",
    "INPLACE_ABN_EPS",
]
