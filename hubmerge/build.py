"""Build the merged weights from the endpoints and a plan per group (method §4's table).

For each layer (rows = output group sections, columns = input group sections):

    rows \\ cols   A-only in      shared in                 B-only in
    A-only out    W_A            W_A                       (not stored)
    shared out    c_A·W_A        (1−α)·W_A + α·P(W_B)      c_B·P(W_B)
    B-only out    (not stored)   P(W_B)                    P(W_B)

with ``c_A, c_B = 1−α, α`` for ``cross="interpolate"`` and ``1, 1`` for ``cross="fill"`` (the logits layer
always interpolates). Biases and norms: A-only from A, B-only from B, shared interpolated.

The table is stored as the blocks of :class:`~hubmerge.partitioned.PartitionedLayer`: ``a_side`` (the top-left 2×2),
``shared_from_b`` (shared rows × B-only columns) and ``b_only`` (B-only rows × shared and B-only columns),
or one ``whole`` block where the layer has no zero block.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .partial import GroupPlan
from .partitioned import PartialMergedModel, Sizes, block_extents
from .spec import Layer, PermutationSpec, expand, permute_state

CROSS_RULES = ("interpolate", "fill")


def _sections(plan: GroupPlan | None, repeat: int, width: int) -> tuple[torch.Tensor, ...]:
    """(A-only, shared-from-A, shared-from-B, B-only) tensor indices along an axis of ``width`` entries."""
    if plan is None:  # fixed input/output: every entry is shared and unpermuted
        every = torch.arange(width)
        return torch.empty(0, dtype=torch.long), every, every, torch.empty(0, dtype=torch.long)
    return tuple(expand(t, repeat) for t in (plan.a_only, plan.shared_a, plan.shared_b, plan.b_only))


def _take(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return w.index_select(0, rows).index_select(1, cols)


def _wide(layer: Layer, plans: dict[str, GroupPlan], sa: dict, sb: dict, alpha: float, cross: str
          ) -> tuple[torch.Tensor, torch.Tensor | None, Sizes, Sizes]:
    """The layer's wide weight (zero blocks included) and bias, with its (out, in) section sizes."""
    wa, wb = sa[f"{layer.name}.weight"], sb[f"{layer.name}.weight"]
    ba, bb = sa.get(f"{layer.name}.bias"), sb.get(f"{layer.name}.bias")
    ro_a, rs_a, rs_b, ro_b = _sections(plans.get(layer.out_group), 1, wa.shape[0])
    ci_a, cs_a, cs_b, ci_b = _sections(plans.get(layer.in_group), layer.in_repeat, wa.shape[1])
    c_a, c_b = (1 - alpha, alpha) if cross == "interpolate" or layer.out_group is None else (1.0, 1.0)

    def zeros(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return wa.new_zeros(len(rows), len(cols), *wa.shape[2:])

    weight = torch.cat([
        torch.cat([_take(wa, ro_a, ci_a), _take(wa, ro_a, cs_a), zeros(ro_a, ci_b)], 1),
        torch.cat([c_a * _take(wa, rs_a, ci_a), (1 - alpha) * _take(wa, rs_a, cs_a) + alpha * _take(wb, rs_b, cs_b),
                   c_b * _take(wb, rs_b, ci_b)], 1),
        torch.cat([zeros(ro_b, ci_a), _take(wb, ro_b, cs_b), _take(wb, ro_b, ci_b)], 1),
    ])
    bias = None if ba is None else torch.cat([ba[ro_a], (1 - alpha) * ba[rs_a] + alpha * bb[rs_b], bb[ro_b]])
    return weight, bias, (len(ro_a), len(rs_a), len(ro_b)), (len(ci_a), len(cs_a), len(ci_b))


def _layer_blocks(layer: Layer, plans: dict[str, GroupPlan], sa: dict, sb: dict, alpha: float, cross: str
                  ) -> dict[str, torch.Tensor]:
    """The stored tensors of one partitioned layer (keys relative to the layer): its wide weight cut
    into the blocks of :func:`~hubmerge.partitioned.block_extents`, which leave out the zero blocks."""
    weight, bias, out_sizes, in_sizes = _wide(layer, plans, sa, sb, alpha, cross)
    out = {}
    for block, ((r0, r1), (c0, c1)) in block_extents(out_sizes, in_sizes).items():
        out[f"{block}.weight"] = weight[r0:r1, c0:c1]
        if bias is not None and block != "shared_from_b":  # shared rows take their bias from a_side
            out[f"{block}.bias"] = bias[r0:r1]
    return out


def _norm_units(plan: GroupPlan, a: torch.Tensor, b: torch.Tensor, alpha: float, dim: int = 0) -> torch.Tensor:
    """A per-unit tensor (a norm parameter, a layer scale) in the layout [A-only | shared | B-only] along ``dim``."""
    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.index_select(dim, index.to(t.device))

    return torch.cat([take(a, plan.a_only), (1 - alpha) * take(a, plan.shared_a) + alpha * take(b, plan.shared_b),
                      take(b, plan.b_only)], dim)


def merged_state(spec: PermutationSpec, plans: dict[str, GroupPlan], state_a: dict, state_b: dict,
                 alpha: float, cross: str) -> dict[str, torch.Tensor]:
    """The partitioned state dict of the merged network (keys as in ``PartialMergedModel.net``)."""
    out: dict[str, torch.Tensor] = {}
    covered = set()
    for layer in spec.layers:
        per_unit = [(layer.norm, p) for p in ("weight", "bias", "running_mean", "running_var") if layer.norm]
        if layer.depthwise:  # one filter per unit: laid out like a norm's parameters
            per_unit += [(layer.name, "weight"), (layer.name, "bias")]
        else:
            for key, t in _layer_blocks(layer, plans, state_a, state_b, alpha, cross).items():
                out[f"{layer.name}.{key}"] = t
        covered.update({f"{layer.name}.weight", f"{layer.name}.bias"})
        for module, p in per_unit:
            key = f"{module}.{p}"
            if key in state_a:
                out[key] = _norm_units(plans[layer.out_group], state_a[key], state_b[key], alpha)
        if layer.norm:
            covered.update(k for k in state_a if k.startswith(f"{layer.norm}."))
            if f"{layer.norm}.num_batches_tracked" in state_a:
                out[f"{layer.norm}.num_batches_tracked"] = state_a[f"{layer.norm}.num_batches_tracked"]
    norms = {n.name: n.group for n in spec.norms}
    per_unit = [(k, norms[k.rpartition(".")[0]], 0) for k in state_a if k.rpartition(".")[0] in norms]
    for key, group, dim in per_unit + [(v.key, v.group, v.dim) for v in spec.vectors]:
        if key in state_a:
            out[key] = _norm_units(plans[group], state_a[key], state_b[key], alpha, dim)
    for key, t in state_a.items():  # anything outside the spec (buffers with no units) comes from A
        if key not in covered and key not in out:
            out[key] = t
    return out


def full_merge_state(spec: PermutationSpec, plans: dict[str, GroupPlan], state_a: dict, state_b: dict,
                     alpha: float) -> dict[str, torch.Tensor]:
    """The state of a full merge (γ=0 everywhere) in the plain architecture: both endpoints permuted into
    the shared order along every axis of the spec, then interpolated (integer buffers from A)."""
    pa = permute_state(spec, state_a, {g: p.shared_a for g, p in plans.items()})
    pb = permute_state(spec, state_b, {g: p.shared_b for g, p in plans.items()})
    return {k: (1 - alpha) * v + alpha * pb[k] if v.is_floating_point() else v for k, v in pa.items()}


def build(spec: PermutationSpec, plans: dict[str, GroupPlan], model_a: nn.Module, model_b: nn.Module, *,
          architecture: str, model_args: dict, alpha: float = 0.5, cross: str = "interpolate",
          **config) -> PartialMergedModel:
    """The partitioned merged model for ``plans`` (γ=0 everywhere gives the ordinary full merge)."""
    if cross not in CROSS_RULES:
        raise UsageError(f"unknown cross-block rule {cross!r}; choose one of {CROSS_RULES}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must be in [0, 1], got {alpha}")
    if spec.partial is None:
        state = merged_state(spec, plans, model_a.state_dict(), model_b.state_dict(), alpha, cross)
    else:  # only full merges: the plain architecture holds them
        state = full_merge_state(spec, plans, model_a.state_dict(), model_b.state_dict(), alpha)
    partition = {g: list(p.sizes) for g, p in plans.items()}
    dtype = next(model_a.parameters()).dtype
    model = PartialMergedModel(architecture, model_args, partition, alpha=alpha, cross=cross, **config)
    model.to(dtype).net.load_state_dict(state, strict=True)
    return model.to(next(model_a.parameters()).device)
