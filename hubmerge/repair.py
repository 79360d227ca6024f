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
from .partitioned import PartialMergedModel
from .spec import Layer
from .statistics import Statistics, layer_moments

REPAIRS = ("repair", "reset")
DEAD = 1e-8  # a merged unit with σ below this is dead: scaling cannot revive it, so only its mean is set


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
def _fold(model: PartialMergedModel, layer: Layer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make the layer's output behave as ``scale·x + shift`` without changing module types."""
    if layer.norm:
        norm = model.net.get_submodule(layer.norm)
        # BN(s·x + t) = (γ·s)·(x − (μ_run − t)/s)/√(σ²_run + ε) + β
        norm.running_mean.copy_(((norm.running_mean.double() - shift) / scale).to(norm.running_mean.dtype))
        norm.weight.mul_(scale.to(norm.weight.dtype))
        return
    part = model.layer(layer.name)
    if part.blocks()[0][1].bias is None:
        raise UsageError(f"REPAIR cannot fold into {layer.name}: no bias and no following norm")
    for block, sub in part.blocks():  # every block scales its rows; the shift goes into each row's one bias
        (r0, r1), _ = part.extent[block]
        s, t = scale[r0:r1], shift[r0:r1]
        sub.weight.mul_(s.view(-1, *([1] * (sub.weight.dim() - 1))).to(sub.weight.dtype))
        if sub.bias is not None:
            sub.bias.copy_((s * sub.bias.double() + t).to(sub.bias.dtype))


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
    reused = shared_prefix(model.spec.layers, plans, reference.plans) if reference else 0
    for i, layer in enumerate(model.spec.layers):
        if i < reused:
            _copy_layer(model, reference.model, layer)
            continue
        if layer.out_group is None:  # the logits are the output, not a unit to renormalise
            continue
        mean_t, std_t, mask = _targets(layer, plans[layer.out_group], stats, model.alpha, unmerged)
        got = layer_moments(model.net, [layer.name], data, device, stop=True)[layer.name]
        std = got.std.cpu()
        scale = torch.where(mask & (std > DEAD), std_t / std.clamp_min(DEAD), torch.ones_like(std))
        shift = torch.where(mask, mean_t - scale * got.mean.cpu(), torch.zeros_like(scale))
        _fold(model, layer, scale, shift)
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
