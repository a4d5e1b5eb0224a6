"""ResNets (He et al. 2016) as torchvision builds them, with two CPU-scale knobs: a width
multiplier and a small-input stem.

At ``width=1`` with the ImageNet stem the networks are exactly torchvision's ``resnet18`` /
``resnet50`` (same modules in the same order, names and parameter shapes, so their state dicts
load both ways). The ``small_input`` stem (3×3 stride-1 conv, no max-pool) is the usual
CIFAR-style variant. Module names (``conv1``/``bn1``, ``layerK.i.convJ``/``bnJ``,
``downsample.0``/``.1``) are kept because Conv+CBN pairing relies on them. The blocks are our
own, not imported: importing torchvision imports ``torch._dynamo`` (about a second), which
config validation (the model built on the meta device) does not need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from bnbench import norm as norms
from bnbench.errors import BnbenchError
from bnbench.models.crops import crop_classifier
from bnbench.models.fpn import fpn_classifier

NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """ResNet-18/34's residual block (He et al. 2016, Fig. 2): two 3×3 convs, each followed by
    the norm layer, a ReLU after the first and after the sum with the shortcut. The stride is
    on the first conv (and on ``downsample``). Attribute names, registration order and shapes
    are torchvision's ``BasicBlock``'s, so state-dict keys match."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet-50's residual block (He et al. 2016, Fig. 5): 1×1 reduce, 3×3, 1×1 expand to
    ``4·planes``, each conv followed by the norm layer; ReLUs as in :class:`BasicBlock`. The
    stride is on the 3×3 conv (torchvision's "ResNet v1.5"; the paper puts it on the first 1×1).
    Attribute names, registration order and shapes are torchvision's ``Bottleneck``'s, so
    state-dict keys match."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]

ARCHS: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNet(nn.Module):
    """torchvision's ResNet (stem, four stages, average pool, ``fc``), with stage widths
    ``round(64·2^i·width)``."""

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int,
        width: float = 1.0,
        small_input: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        widths = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self.inplanes = widths[0]
        self._norm_layer = norm_layer
        if small_input:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        #: Channels of the outputs of layer1 … layer4 (what a feature pyramid's laterals take).
        self.stage_channels = [w * block.expansion for w in widths]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            # (Not on the meta device, which has no values: its normal_ imports torch._dynamo.)
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # every residual branch starts at zero (its last norm's γ = 0)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                    if getattr(last, "weight", None) is not None:
                        nn.init.zeros_(last.weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                self._norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [
            block(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The outputs of layer1 … layer4 (strides 1, 2, 4, 8 relative to the stem's output)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x):
        return self.forward_stages(x)[-1]

    def forward(self, x):
        return self.fc(self.avgpool(self.forward_features(x)).flatten(1))


def resnet(
    arch: str,
    num_classes: int,
    *,
    width: float = 1.0,
    small_input: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """A ResNet with plain ``nn.BatchNorm2d`` (convert it with :func:`bnbench.norm.convert`)."""
    if arch not in ARCHS:
        raise BnbenchError(f"model.arch={arch}: choose one of {', '.join(ARCHS)}")
    if width <= 0:
        raise BnbenchError(f"model.width={width}: must be positive")
    block, layers = ARCHS[arch]
    return ResNet(
        block, layers, num_classes, width, small_input, zero_init_residual=zero_init_residual
    )


#: ``model.head`` values: what follows the backbone.
HEADS = ("pool", "fpn", "crops")


def build_model(
    model_cfg: Any, norm_name: str, norm_options: dict[str, Any], num_classes: int
) -> nn.Module:
    """Model from config: the architecture, then the normalization swapped in by the registry."""
    if model_cfg.head not in HEADS:
        raise BnbenchError(f"model.head={model_cfg.head}: choose one of {', '.join(HEADS)}")
    model = resnet(
        model_cfg.arch,
        num_classes,
        width=model_cfg.width,
        small_input=model_cfg.small_input,
        zero_init_residual=model_cfg.zero_init_residual,
    )
    if model_cfg.head == "crops":  # norm is the head's here; the backbone's is model.crops'
        return crop_classifier(model, model_cfg.crops, norm_name, norm_options, num_classes)
    model = norms.convert(model, norm_name, **norm_options)
    if model_cfg.head == "fpn":  # the head's own norm, built after the backbone's swap
        return fpn_classifier(model, model_cfg.fpn, num_classes)
    return model
