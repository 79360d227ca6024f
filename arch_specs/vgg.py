"""VGG family: timm's ``vgg11/13/16/19`` (+ ``_bn``, with the ConvMlp pre-logits) and hubmerge's
CIFAR-style ``hubmerge_vgg11/13/16/19`` (BN, width multiplier, one linear classifier on the flattened map).
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.vgg import VGG
from torch import nn

from hubmerge.spec import Group, Layer, PermutationSpec

from . import register_adapter
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


def _conv_stack(features: nn.Sequential) -> tuple[dict[str, Group], list[Layer], str]:
    """Groups and layers of a Sequential of Conv2d → (BatchNorm2d) → ReLU → (MaxPool) blocks."""
    groups: dict[str, Group] = {}
    layers: list[Layer] = []
    prev = None
    children = list(features.named_children())
    for i, (n, module) in enumerate(children):
        if not isinstance(module, nn.Conv2d):
            continue
        name = f"features.{n}"
        following = children[i + 1 : i + 3]
        norm = next((f"features.{k}" for k, m in following if isinstance(m, nn.BatchNorm2d)), None)
        act = next(f"features.{k}" for k, m in following if isinstance(m, nn.ReLU))
        groups[name] = Group(name, module.out_channels, (act,))
        layers.append(Layer(name, name, prev, norm))
        prev = name
    return groups, layers, prev


class CifarVGGAdapter:
    family = "cifar_vgg"
    description = "hubmerge_vgg11/13/16/19 (CIFAR-style, BN, width multiplier)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, CifarVGG)

    def spec(self, model: nn.Module) -> PermutationSpec:
        groups, layers, last = _conv_stack(model.features)
        repeat = model.head.in_features // groups[last].width
        layers.append(Layer("head", None, last, in_repeat=repeat))
        return PermutationSpec(self.family, groups, tuple(layers))

    def model_args(self, model: nn.Module) -> dict:
        return dict(model.model_args)


class TimmVGGAdapter:
    family = "timm_vgg"
    description = "timm vgg11/13/16/19 and *_bn (ConvMlp pre-logits, any mlp_ratio)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VGG)

    def spec(self, model: nn.Module) -> PermutationSpec:
        groups, layers, last = _conv_stack(model.features)
        for fc, act in (("fc1", "act1"), ("fc2", "act2")):
            name = f"pre_logits.{fc}"
            groups[name] = Group(name, getattr(model.pre_logits, fc).out_channels, (f"pre_logits.{act}",))
            layers.append(Layer(name, name, last))
            last = name
        layers.append(Layer("head.fc", None, last))
        return PermutationSpec(self.family, groups, tuple(layers))

    def model_args(self, model: nn.Module) -> dict:
        return dict(
            num_classes=model.head.fc.out_features,
            in_chans=model.features[0].in_channels,
            mlp_ratio=model.pre_logits.fc1.out_channels / 4096,
        )


register_adapter(CifarVGGAdapter())
register_adapter(TimmVGGAdapter())
