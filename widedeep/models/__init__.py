"""ResNet-38 (Models A, A1, A2) and its "2 conv." segmentation nets."""

from .factory import create_model
from .registry import DATASETS, ModelLabel, list_models, model_args, parse_label
from .resnet38 import BN_EPS, LEVELS, PreActUnit, ResNet38, TwoConvHead, build_plan
from .timm_registration import register_timm  # imports timm only when called

__all__ = [
    "BN_EPS", "DATASETS", "LEVELS", "ModelLabel", "PreActUnit", "ResNet38", "TwoConvHead", "build_plan",
    "create_model", "list_models", "model_args", "parse_label", "register_timm",
]
