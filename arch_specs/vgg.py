"""hubmerge's CIFAR-style ``hubmerge_vgg11/13/16/19`` (BN, width multiplier, one linear classifier on the
flattened map), registered in timm; timm's own VGGs need nothing here."""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from .literature import finish

CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """The VGG of the merging literature: conv-BN-ReLU stack, five max-pools, one Linear on the flat map.

    The classifier reads the flattened ``C × s × s`` map (``s = img_size / 32``), which is where the spec's
    flatten stride matters when ``img_size > 32``.
    """

    def __init__(self, depth: int, width_multiplier: float, in_chans: int, img_size: int, num_classes: int):
        super().__init__()
        if img_size % 32:
            raise ValueError(f"hubmerge_vgg needs img_size divisible by 32 (five 2x pools), got {img_size}")
        mods: list[nn.Module] = []
        prev = in_chans
        for c in CFGS[depth]:
            if c == "M":
                mods.append(nn.MaxPool2d(2))
                continue
            width = max(1, round(c * width_multiplier))
            mods += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            prev = width
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(prev * (img_size // 32) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _register(depth: int) -> None:
    name = f"hubmerge_vgg{depth}"

    def entry(pretrained: bool = False, width_multiplier: float = 1.0, in_chans: int = 3, img_size: int = 32,
              num_classes: int = 10, **kwargs) -> CifarVGG:
        args = dict(width_multiplier=width_multiplier, in_chans=in_chans, img_size=img_size, num_classes=num_classes)
        return finish(CifarVGG(depth, **args), name, args, kwargs, first_conv="features.0")

    entry.__name__ = name
    entry.__doc__ = f"CIFAR-style VGG{depth} with BatchNorm."
    register_model(entry)


for _depth in CFGS:
    _register(_depth)
