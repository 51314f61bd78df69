"""ResNet-38 (Models A, A1, A2) and its "2 conv." segmentation nets."""

from .registry import (
    DATASETS, ModelLabel, create_model, list_models, model_args, parse_label,
)
from widedeep._timm_hook import register_timm  # (torch-free; imports timm only when called)
from .resnet38 import BN_EPS, LEVELS, PreActUnit, ResNet38, TwoConvHead, build_plan

__all__ = [
    "BN_EPS", "DATASETS", "LEVELS", "ModelLabel", "PreActUnit", "ResNet38", "TwoConvHead", "build_plan",
    "create_model", "list_models", "model_args", "parse_label", "register_timm",
]
