"""``hubmerge_mlp`` (depth hidden layers of one width, optional BatchNorm), registered in timm."""

from __future__ import annotations

from collections import OrderedDict

import torch
from timm.models import register_model
from torch import nn

from .literature import finish


class MLP(nn.Module):
    """Flatten → [Linear → (BN) → ReLU] × depth → Linear, the thesis's MLP3 at depth=3, width=512."""

    def __init__(self, depth: int, width: int, bn: bool, in_chans: int, img_size: int, num_classes: int):
        super().__init__()
        prev = in_chans * img_size * img_size
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            norm = nn.BatchNorm1d(width) if bn else nn.Identity()
            self.blocks.append(nn.Sequential(OrderedDict(fc=nn.Linear(prev, width), norm=norm, act=nn.ReLU())))
            prev = width
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@register_model
def hubmerge_mlp(pretrained: bool = False, depth: int = 3, width: int = 512, bn: bool = False, in_chans: int = 1,
                 img_size: int = 28, num_classes: int = 10, **kwargs) -> MLP:
    """An MLP for small images (MNIST-like by default)."""
    args = dict(depth=depth, width=width, bn=bn, in_chans=in_chans, img_size=img_size, num_classes=num_classes)
    return finish(MLP(**args), "hubmerge_mlp", args, kwargs, first_conv="blocks.0.fc")
