"""hubmerge's CIFAR ``hubmerge_resnet20`` (width multiplier), built from timm's blocks and registered in timm."""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock
from torch import nn

from .literature import finish


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 images: 3×3 stem, three stages of BasicBlocks, 1×1-conv shortcuts."""

    def __init__(self, depth: int, width_multiplier: int, in_chans: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        widths = [16 * width_multiplier, 32 * width_multiplier, 64 * width_multiplier]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        prev = widths[0]
        for s, width in enumerate(widths):
            blocks = []
            for b in range((depth - 2) // 6):
                stride = 2 if s > 0 and b == 0 else 1
                down = None
                if stride != 1 or prev != width:
                    down = nn.Sequential(nn.Conv2d(prev, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(prev, width, stride=stride, downsample=down))
                prev = width
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


@register_model
def hubmerge_resnet20(pretrained: bool = False, width_multiplier: int = 1, in_chans: int = 3, num_classes: int = 10,
                      **kwargs) -> CifarResNet:
    """CIFAR ResNet20 (×width_multiplier), as in REPAIR and Semi-Ensemble."""
    args = dict(width_multiplier=width_multiplier, in_chans=in_chans, num_classes=num_classes)
    return finish(CifarResNet(20, **args), "hubmerge_resnet20", args, kwargs, first_conv="conv1")
