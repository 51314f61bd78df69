"""widedeep: the "Wider or Deeper" ResNet-38 family in PyTorch."""

__version__ = "0.1.0"
