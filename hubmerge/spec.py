"""The permutation spec: the one description of a model's unit structure that every stage reads.

A *group* is a set of units (neurons, channels) that must be permuted together: the output axis of every
layer writing into it (a residual stream ties several), their biases and norms, and the input axis of
every layer reading from it. A *layer* is a conv/linear module; its parameter axes are derived from its
output group, input group, following norm and flatten stride, so matching, building, REPAIR and cost
counting cannot disagree about which axis belongs to which group. ``None`` as a group means the fixed
network input (image channels) or fixed output (logits), never permuted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Group:
    """Units permuted together; ``observe`` names the modules whose outputs carry them (for matching)."""

    name: str
    width: int
    observe: tuple[str, ...]


@dataclass(frozen=True)
class Layer:
    """A conv or linear module and the groups on its output and input axes.

    ``in_repeat`` is the flatten stride: a Linear that reads a flattened C×H×W map holds each input unit
    ``H·W`` times, contiguously. ``norm`` is the per-unit norm applied to this layer's output, if any.
    """

    name: str
    out_group: str | None
    in_group: str | None
    norm: str | None = None
    in_repeat: int = 1


Axis = tuple[str, int]  # (group, repeat) on one tensor dimension


@dataclass(frozen=True)
class PermutationSpec:
    """Groups (front to back) and layers (in forward order) of one architecture family."""

    family: str
    groups: dict[str, Group]
    layers: tuple[Layer, ...]

    def param_axes(self) -> dict[str, tuple[Axis | None, ...]]:
        """Map every state-dict tensor the spec touches to its permuted axes (None = not permuted)."""
        axes: dict[str, tuple[Axis | None, ...]] = {}
        for layer in self.layers:
            out = (layer.out_group, 1) if layer.out_group else None
            inp = (layer.in_group, layer.in_repeat) if layer.in_group else None
            axes[f"{layer.name}.weight"] = (out, inp)
            axes[f"{layer.name}.bias"] = (out,)
            if layer.norm:
                for p in NORM_PARAMS:
                    axes[f"{layer.norm}.{p}"] = (out,)
        return axes

    def layers_reading(self, group: str) -> list[Layer]:
        """Layers whose input axis belongs to ``group``."""
        return [layer for layer in self.layers if layer.in_group == group]

    def validate(self, model: nn.Module) -> None:
        """Check the spec against a model: widths agree and every parameter is covered.

        An adapter that forgets a parameter would leave it unpermuted and silently break the function;
        this makes that a loud error instead.
        """
        modules = dict(model.named_modules())
        covered = set()
        for layer in self.layers:
            module = modules.get(layer.name)
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                raise UnsupportedModelError(f"spec layer {layer.name!r} is not a Conv2d/Linear in the model")
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise UnsupportedModelError(f"grouped/depthwise conv {layer.name!r} is not supported")
            w = module.weight
            if layer.out_group and w.shape[0] != self.groups[layer.out_group].width:
                raise UnsupportedModelError(f"{layer.name}: {w.shape[0]} outputs != width of {layer.out_group}")
            if layer.in_group and w.shape[1] != self.groups[layer.in_group].width * layer.in_repeat:
                raise UnsupportedModelError(f"{layer.name}: {w.shape[1]} inputs != width of {layer.in_group}")
            covered.update(f"{layer.name}.{n}" for n, _ in module.named_parameters())
            if layer.norm:
                norm = modules.get(layer.norm)
                if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
                    raise UnsupportedModelError(f"spec norm {layer.norm!r} is not a BatchNorm in the model")
                covered.update(f"{layer.norm}.{n}" for n, _ in norm.named_parameters())
        for group in self.groups.values():
            for name in group.observe:
                if name not in modules:
                    raise UnsupportedModelError(f"group {group.name}: observed module {name!r} not in the model")
        missing = [n for n, _ in model.named_parameters() if n not in covered]
        if missing:
            raise UnsupportedModelError(
                f"the {self.family} spec does not cover parameters {missing[:5]}; the adapter is incomplete"
            )


def expand(index: torch.Tensor, repeat: int) -> torch.Tensor:
    """Expand unit indices to tensor indices when each unit spans ``repeat`` contiguous entries."""
    if repeat == 1:
        return index
    return (index[:, None] * repeat + torch.arange(repeat, device=index.device)).reshape(-1)


def permute_state(
    spec: PermutationSpec, state: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply per-group permutations to a state dict: unit ``i`` of the result is unit ``perms[g][i]``.

    Groups missing from ``perms`` stay as they are. The function of the model is unchanged.
    """
    out = dict(state)
    for name, axes in spec.param_axes().items():
        if name not in state:
            continue
        t = state[name]
        for dim, axis in enumerate(axes):
            if axis is not None and axis[0] in perms:
                t = t.index_select(dim, expand(perms[axis[0]].to(t.device), axis[1]))
        out[name] = t
    return out
