"""Data pipelines for ILSVRC and VOC / Cityscapes / ADE20K segmentation: DALI where installed, torch elsewhere."""

from .errors import BadSampleError
from .labels import IGNORE, LABEL_SPACES, LabelSpace
from .layouts import DATASETS, SPLITS, DatasetError, DatasetIndex, Sample, discover
from .loader import Loader, build_loader, make_recipe
from .recipes import MEAN, STD, ClsTrain, ClsVal, SegTrain, SegVal

__all__ = [
    "BadSampleError", "ClsTrain", "ClsVal", "DATASETS", "DatasetError", "DatasetIndex", "IGNORE", "LABEL_SPACES",
    "LabelSpace", "Loader", "MEAN", "SPLITS", "STD", "Sample", "SegTrain", "SegVal", "build_loader", "discover",
    "make_recipe",
]
