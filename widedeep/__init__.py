"""widedeep: the "Wider or Deeper" ResNet-38 family in PyTorch.

``import widedeep`` registers ``resnet38_a1`` etc. with timm (``timm.create_model``), lazily: right away when
timm is already imported, else when it is first imported; it never imports timm or torch itself.
"""

__version__ = "0.1.0"

from . import _timm_hook

_timm_hook.install()
