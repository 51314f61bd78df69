"""Data pipelines for ILSVRC and VOC / Cityscapes / ADE20K segmentation: DALI where installed, torch elsewhere."""

from .errors import BadSampleError
from .labels import IGNORE, LABEL_SPACES, LabelSpace
from .layouts import DATASETS, SPLITS, DatasetError, DatasetIndex, Sample, discover
from .recipes import MEAN, STD, ClsTrain, ClsVal, SegTrain, SegVal

__all__ = [
    "BadSampleError",
    "ClsTrain",
    "ClsVal",
    "DATASETS",
    "DatasetError",
    "DatasetIndex",
    "IGNORE",
    "LABEL_SPACES",
    "LabelSpace",
    "Loader",
    "MEAN",
    "SPLITS",
    "STD",
    "Sample",
    "SegTrain",
    "SegVal",
    "build_loader",
    "discover",
    "make_recipe",
]

_LAZY = {"Loader", "build_loader", "make_recipe"}


def __getattr__(name: str):
    # The loader imports torch; DALI's spawned feed workers import this package (data_pipes.feed) and must not
    # pay torch's import time at every start.
    if name in _LAZY:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
