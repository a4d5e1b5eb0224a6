"""ResNet-18/50 (torchvision's blocks) with the normalization layer injected from the registry."""

from bnbench.models.resnet import build_model, resnet

__all__ = ["build_model", "resnet"]
