"""REPAIR (method §5): undo the variance collapse of interpolated units.

``repair``: for each layer, front to back, measure the merged model's pre-activation mean/std per unit on
calibration data and fold an affine correction into the layer (into its norm when one follows, else into
its weight and bias), so the statistics become the endpoints' interpolated ones
(μ* = (1−α)μ_A + αμ_B, σ* = (1−α)σ_A + ασ_B). Shared units always; unmerged units toward their own
endpoint's statistics when ``unmerged=True``. ``reset``: re-estimate BatchNorm running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .data import Batches, batches
from .errors import UsageError
from .partial import GroupPlan
from .partitioned import PartialMergedModel, PartitionedLayer
from .spec import Layer
from .statistics import Statistics, layer_moments

REPAIRS = ("repair", "reset")
DEAD = 1e-8  # a unit with σ below this is dead (constant on the calibration data)


def _targets(layer: Layer, plan: GroupPlan, stats: Statistics, alpha: float, unmerged: bool):
    """Target mean/std per merged unit and the mask of units to correct."""
    a, b = stats.layers_a[layer.name], stats.layers_b[layer.name]

    def lay(ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return torch.cat([ta[plan.a_only], (1 - alpha) * ta[plan.shared_a] + alpha * tb[plan.shared_b],
                          tb[plan.b_only]])

    ka, m, kb = plan.sizes
    mask = torch.cat([torch.full((ka,), unmerged), torch.ones(m, dtype=torch.bool), torch.full((kb,), unmerged)])
    return lay(a.mean, b.mean), lay(a.std, b.std), mask


@torch.no_grad()
def _fold(net: nn.Module, norm: str | None, rows: list[tuple[nn.Module, int, int]], scale: torch.Tensor,
          shift: torch.Tensor) -> None:
    """Make a layer's output behave as ``scale·x + shift`` without changing module types: into the
    BatchNorm that reads it, else into ``rows`` (sub-layers covering output rows r0:r1; the shift goes
    into the one bias each row has)."""
    if norm:
        bn = net.get_submodule(norm)
        # BN(s·x + t) = (γ·s)·(x − (μ_run − t)/s)/√(σ²_run + ε) + β
        bn.running_mean.copy_(((bn.running_mean.double() - shift) / scale).to(bn.running_mean.dtype))
        bn.weight.mul_(scale.to(bn.weight.dtype))
        return
    for sub, r0, r1 in rows:
        s, t = scale[r0:r1], shift[r0:r1]
        sub.weight.mul_(s.view(-1, *([1] * (sub.weight.dim() - 1))).to(sub.weight.dtype))
        if sub.bias is not None:
            sub.bias.copy_((s * sub.bias.double() + t).to(sub.bias.dtype))


@torch.no_grad()
def _correct(net: nn.Module, name: str, norm: str | None, rows: list[tuple[nn.Module, int, int]],
             target: tuple[torch.Tensor, torch.Tensor, torch.Tensor], data: Batches,
             device: torch.device | str) -> None:
    """Measure one layer's output on ``data`` and fold the affine map that gives it the target mean/std
    (``target`` = mean, std, mask of units to correct)."""
    mean_t, std_t, mask = target
    got = layer_moments(net, [name], data, device, stop=True)[name]
    std = got.std.cpu()
    # a unit dead in the merge or in the target (constant on the data) only gets its mean set: scaling
    # cannot revive it, and a zero scale cannot be folded into a following BatchNorm
    scale = torch.where(mask & (std > DEAD) & (std_t > DEAD), std_t / std.clamp_min(DEAD), torch.ones_like(std))
    shift = torch.where(mask, mean_t - scale * got.mean.cpu(), torch.zeros_like(scale))
    _fold(net, norm, rows, scale, shift)


@dataclass(frozen=True)
class Repaired:
    """A repaired merge and the plans it was built from, kept so a candidate that differs only in later
    groups can copy the corrections of the layers in front of the first difference instead of measuring
    them again (the budget search builds many such candidates)."""

    model: PartialMergedModel
    plans: dict[str, GroupPlan]


def _same(p: GroupPlan, q: GroupPlan) -> bool:
    return p is q or all(torch.equal(getattr(p, f.name), getattr(q, f.name)) for f in fields(GroupPlan))


def shared_prefix(layers: list[Layer], plans: dict[str, GroupPlan], other: dict[str, GroupPlan]) -> int:
    """How many leading layers (in forward order) read and write only groups planned alike in both."""
    for i, layer in enumerate(layers):
        if any(g is not None and not _same(plans[g], other[g]) for g in (layer.in_group, layer.out_group)):
            return i
    return len(layers)


@torch.no_grad()
def _copy_layer(model: PartialMergedModel, source: PartialMergedModel, layer: Layer) -> None:
    for name in filter(None, (layer.name, layer.norm)):
        model.net.get_submodule(name).load_state_dict(source.net.get_submodule(name).state_dict())


def repair(model: PartialMergedModel, plans: dict[str, GroupPlan], stats: Statistics, data: Batches, *,
           unmerged: bool = False, device: torch.device | str = "cpu", reference: Repaired | None = None
           ) -> PartialMergedModel:
    """Correct every hidden layer's pre-activation statistics in place, front to back.

    With a ``reference`` repaired the same way (same endpoints, data and settings), the layers in front of
    the first group planned differently copy its corrections: their inputs are the same, so measuring
    them again would give the same numbers.
    """
    if model.spec.partial is not None:
        return _repair_plain(model, plans, stats, data, device)
    reused = shared_prefix(model.spec.layers, plans, reference.plans) if reference else 0
    for i, layer in enumerate(model.spec.layers):
        if i < reused:
            _copy_layer(model, reference.model, layer)
            continue
        if layer.out_group is None:  # the logits are the output, not a unit to renormalise
            continue
        part = model.layer(layer.name)
        rows = ([(sub, *part.extent[block][0]) for block, sub in part.blocks()] if isinstance(part, PartitionedLayer)
                else [(part, 0, part.out_channels)])  # a depthwise conv is stored plainly
        if layer.norm is None and rows[0][0].bias is None:
            raise UsageError(f"REPAIR cannot fold into {layer.name}: no bias and no following norm")
        target = _targets(layer, plans[layer.out_group], stats, model.alpha, unmerged)
        _correct(model.net, layer.name, layer.norm, rows, target, data, device)
    return model


def _repair_plain(model: PartialMergedModel, plans: dict[str, GroupPlan], stats: Statistics, data: Batches,
                  device: torch.device | str) -> PartialMergedModel:
    """REPAIR of a full merge held in the plain architecture (families without partial merging): every
    output of :attr:`~hubmerge.spec.PermutationSpec.outputs`, front to back; position p holds A's unit p
    and B's unit matched to it, so its target interpolates their statistics there."""
    spec, alpha = model.spec, model.alpha
    matched = {g: p.shared_b for g, p in plans.items()}
    for out in spec.outputs:
        a, b = stats.layers_a[out.name], stats.layers_b[out.name]
        index = spec.gather(f"{out.name}.weight", 0, matched)
        index = torch.arange(len(a.mean)) if index is None else index
        mask = torch.cat([torch.full((seg.size,), seg.group is not None) for seg in spec.axes[f"{out.name}.weight"][0]])
        target = ((1 - alpha) * a.mean + alpha * b.mean[index], (1 - alpha) * a.std + alpha * b.std[index], mask)
        module = model.net.get_submodule(out.name)
        _correct(model.net, out.name, out.norm, [(module, 0, len(mask))], target, data, device)
    return model


@torch.no_grad()
def reset_norms(model: nn.Module, data: Batches, device: torch.device | str = "cpu") -> nn.Module:
    """REPAIR's RESET: recompute every BatchNorm's running statistics on ``data`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise UsageError("repair='reset' re-estimates BatchNorm statistics, but the model has none; use 'repair'")
    model.eval().to(device)
    momenta = [n.momentum for n in norms]
    for n in norms:
        n.reset_running_stats()
        n.momentum = None
        n.train()
    try:
        for x, _ in batches(data, device):
            model(x)
    finally:
        for n, mom in zip(norms, momenta):
            n.momentum = mom
        model.eval()
    return model


def apply(model: PartialMergedModel, method: str | None, plans: dict[str, GroupPlan], stats: Statistics | None,
          data: Batches | None, *, unmerged: bool = False, device: torch.device | str = "cpu",
          reference: Repaired | None = None) -> PartialMergedModel:
    """Run the chosen REPAIR variant (None = leave the merge as built); ``reference`` as in :func:`repair`."""
    if method is None:
        return model
    if method not in REPAIRS:
        raise UsageError(f"unknown repair {method!r}; choose one of {REPAIRS} or None")
    if data is None:
        raise UsageError(f"repair={method!r} needs calibration data")
    if method == "reset":
        reset_norms(model, data, device)
        return model
    return repair(model, plans, stats, data, unmerged=unmerged, device=device, reference=reference)
