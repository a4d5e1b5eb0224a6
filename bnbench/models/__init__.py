"""ResNet-18/50 (torchvision's layout and state-dict keys) with the normalization layer injected
from the registry."""

from bnbench.models.resnet import build_model, resnet

__all__ = ["build_model", "resnet"]
