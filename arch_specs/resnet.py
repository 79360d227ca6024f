"""ResNet family: timm's ResNet (BasicBlock and Bottleneck: resnet18/34/50…, any ``channels``, ``in_chans``,
``num_classes``) and hubmerge's CIFAR ``hubmerge_resnet20`` (width multiplier), built from timm's blocks.

Every layer that writes into a residual stream (the stem or a stage's downsample, and each block's last
conv) shares one group; a stage with a downsample starts a new stream.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from hubmerge.errors import UnsupportedModelError
from hubmerge.spec import Group, Layer, PermutationSpec

from . import register_adapter
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


def _stages(model: nn.Module) -> list[str]:
    return [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]


def _downsample(block_name: str, down: nn.Module) -> tuple[str, str]:
    """(conv, norm) module paths of a shortcut; only conv+BN shortcuts (optionally after a pool) are supported."""
    convs = [n for n, m in down.named_children() if isinstance(m, nn.Conv2d)]
    norms = [n for n, m in down.named_children() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != 1 or len(norms) != 1:
        raise UnsupportedModelError(f"{block_name}.downsample is not a conv+BatchNorm shortcut")
    return f"{block_name}.downsample.{convs[0]}", f"{block_name}.downsample.{norms[0]}"


def resnet_spec(model: nn.Module, family: str) -> PermutationSpec:
    """Spec of any model with a conv1/bn1/act1 stem, layerN stages of timm blocks and an ``fc`` head."""
    if not isinstance(model.conv1, nn.Conv2d):
        raise UnsupportedModelError("only the plain ResNet stem (one conv1) is supported, not deep stems")
    widths = {"conv1": model.conv1.out_channels}
    observe: dict[str, list[str]] = {"conv1": ["act1"]}
    layers = [Layer("conv1", "conv1", None, "bn1")]
    stream = "conv1"
    for stage in _stages(model):
        for i, block in enumerate(getattr(model, stage)):
            name = f"{stage}.{i}"
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise UnsupportedModelError(f"{name} is a {type(block).__name__}, not a BasicBlock/Bottleneck")
            if getattr(block, "se", None) is not None or not isinstance(block.aa, nn.Identity):
                raise UnsupportedModelError(f"{name} has attention or anti-aliasing layers, not supported yet")
            n_convs = 3 if isinstance(block, Bottleneck) else 2
            inner = stream
            for j in range(1, n_convs):
                group = f"{name}.conv{j}"
                widths[group] = getattr(block, f"conv{j}").out_channels
                observe[group] = [f"{name}.act{j}"]
                layers.append(Layer(group, group, inner, f"{name}.bn{j}"))
                inner = group
            out = stream
            if block.downsample is not None:
                out = stage if stage not in widths else name
                widths[out] = getattr(block, f"conv{n_convs}").out_channels
                observe[out] = []
            layers.append(Layer(f"{name}.conv{n_convs}", out, inner, f"{name}.bn{n_convs}"))
            if block.downsample is not None:
                conv, norm = _downsample(name, block.downsample)
                layers.append(Layer(conv, out, stream, norm))
            observe[out].append(name)
            stream = out
    layers.append(Layer("fc", None, stream))
    groups = {g: Group(g, widths[g], tuple(observe[g])) for g in widths}
    return PermutationSpec(family, groups, tuple(layers))


class TimmResNetAdapter:
    family = "timm_resnet"
    description = "timm resnet18/34/50… (BasicBlock/Bottleneck, any channels, in_chans, num_classes)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def spec(self, model: nn.Module) -> PermutationSpec:
        return resnet_spec(model, self.family)

    def model_args(self, model: nn.Module) -> dict:
        return dict(
            num_classes=model.fc.out_features,
            in_chans=model.conv1.in_channels,
            channels=tuple(getattr(model, s)[0].conv1.out_channels for s in _stages(model)),
        )


class CifarResNetAdapter:
    family = "cifar_resnet"
    description = "hubmerge_resnet20 (CIFAR-style, width multiplier)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, CifarResNet)

    def spec(self, model: nn.Module) -> PermutationSpec:
        return resnet_spec(model, self.family)

    def model_args(self, model: nn.Module) -> dict:
        return dict(model.model_args)


register_adapter(TimmResNetAdapter())
register_adapter(CifarResNetAdapter())
