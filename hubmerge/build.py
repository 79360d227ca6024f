"""Build the merged weights from the endpoints and a plan per group (method §4's table).

For each layer (rows = output group sections, columns = input group sections):

    rows \\ cols   A-only in      shared in                 B-only in
    A-only out    W_A            W_A                       (not stored)
    shared out    c_A·W_A        (1−α)·W_A + α·P(W_B)      c_B·P(W_B)
    B-only out    (not stored)   P(W_B)                    P(W_B)

with ``c_A, c_B = 1−α, α`` for ``cross="interpolate"`` and ``1, 1`` for ``cross="fill"`` (the logits layer
always interpolates). Biases and norms: A-only from A, B-only from B, shared interpolated. N endpoints
weighted ``w_i`` (an N-way partial merge) follow the same table with a row and a column section per endpoint
(:func:`~hubmerge.partial.block_weights`): each endpoint's own rows read its own and the shared columns,
shared rows read everything, ``w_i``-weighted, and one endpoint's own rows never read another's.

Each axis of a layer is its segments one after the other, each laid out so (:func:`~hubmerge.partial.layout`):
most layers map one group to one group, a fused ``qkv`` projection holds q, k and v of every head, a grouped
conv's weight holds one block's input axis and every block's outputs (each block laid out on its own). The table
is stored as the blocks of :class:`~hubmerge.partitioned.PartitionedLayer`: ``a_side`` (the top-left 2×2),
``shared_from_b`` (shared rows × B-only columns) and ``b_only`` (B-only rows × shared and B-only columns),
then ``shared_from_c``, ``c_only``, … for more endpoints, with rows and columns in section order, or one
``whole`` block where the layer has no zero block.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .partial import SHARED, GroupPlan, Layout, Weights, block_weights, head_layout, layout, owner, sections
from .partitioned import BlockLayout, PartialMergedModel, copy_names
from .spec import Layer, PermutationSpec, permute_state
from .matching import Matchings, is_matching, matched_state

CROSS_RULES = ("interpolate", "fill")


def _wide(layer: Layer, plans: dict[str, GroupPlan], states: list[dict], weights: Weights, cross: str
          ) -> tuple[torch.Tensor, torch.Tensor | None, Layout, Layout]:
    """The layer's wide weight (zero blocks included) and bias in the merged order of its axes, with the
    layouts of its output and input axes."""
    n = len(states)
    rows, cols = layout(layer.out_axis, plans), layout(layer.in_axis, plans)
    # coefficients of each endpoint's weight per (row kind, column section): the table in the module docstring;
    # row kind N+1 is the logits (fixed rows), which always interpolate their cross blocks
    # a weight-standardised conv stores each endpoint's own weights in its cross blocks: it standardises each
    # endpoint's view of its inputs and applies the rule to the standardised views (PartitionedStdConv)
    table = block_weights(weights, weights if cross == "interpolate" and not layer.standardised else (1.0,) * n)
    kind = torch.where(rows.fixed, n + 1, rows.section)
    given = [state[f"{layer.name}.weight"] for state in states]
    weight = given[0].new_zeros(len(kind), len(cols.section), *given[0].shape[2:])
    for r in range(n + 2):
        ri = torch.nonzero(kind == r).flatten()
        for c in range(n + 1):
            ci = torch.nonzero(cols.section == c).flatten()
            coefficients = table[:, r, c].tolist()
            if not len(ri) or not len(ci) or not any(coefficients):
                continue
            block = None
            for w, at, coefficient in zip(given, zip(rows.sources, cols.sources), coefficients):
                if coefficient:
                    term = coefficient * w.index_select(0, at[0][ri]).index_select(1, at[1][ci])
                    block = term if block is None else block + term
            weight[ri[:, None], ci[None, :]] = block
    biases = [state.get(f"{layer.name}.bias") for state in states]
    bias = None if biases[0] is None else rows.combine(biases, weights)
    return weight, bias, rows, cols


def _layer_blocks(layer: Layer, plans: dict[str, GroupPlan], states: list[dict], weights: Weights, cross: str
                  ) -> dict[str, torch.Tensor]:
    """The stored tensors of one partitioned layer (keys relative to the layer): its wide weight cut into the
    blocks of its :class:`~hubmerge.partitioned.BlockLayout`, which leave out the zero blocks."""
    weight, bias, rows, cols = _wide(layer, plans, states, weights, cross)
    blocks = BlockLayout.of(rows.section, cols.section, layer.blocks)
    out = {}
    if layer.standardised:  # per-unit gain and bias of every row, in the natural order
        out["gain"] = rows.combine([state[f"{layer.name}.gain"] for state in states], weights)
        if bias is not None:
            out["bias"], bias = bias, None
    for block in blocks.extent:
        r = blocks.rows(block)
        out[f"{block}.weight"] = weight[r][:, blocks.cols(block)]
        if bias is not None and not block.startswith("shared_from_"):  # shared rows take their bias from a_side
            out[f"{block}.bias"] = bias[r]
    return out


def merged_state(spec: PermutationSpec, plans: dict[str, GroupPlan], states: list[dict], weights: Weights,
                 cross: str) -> dict[str, torch.Tensor]:
    """The partitioned state dict of the merged network (keys as in ``PartialMergedModel.net``) of the
    endpoints' ``states`` weighted by ``weights`` (``1−α``, ``α`` for two)."""
    out: dict[str, torch.Tensor] = {}
    covered, first = set(), states[0]
    partition = {g: p.sizes for g, p in plans.items()}
    across = {a.layer: sections(a.axis, partition) for a in spec.across}
    for layer in spec.layers:
        per_unit = [(layer.norm, p) for p in ("weight", "bias", "running_mean", "running_var") if layer.norm]
        passing = across.get(layer.name)
        if layer.depthwise:  # one filter per unit: laid out like a norm's parameters
            per_unit += [(layer.name, p) for p in ("weight", "bias", "gain")]
        elif passing is not None and (passing != SHARED).any():  # a copy per section of the units passing by
            for section, name in enumerate(copy_names(len(states))):
                if (passing == section).any():  # (its own groups keep their width: one block, A's, merged, B's…)
                    at = weights if section == SHARED else tuple(float(i == owner(section)) for i in range(len(states)))
                    weight, bias, _, _ = _wide(layer, plans, states, at, cross)
                    out[f"{layer.name}.{name}.weight"] = weight
                    if bias is not None:
                        out[f"{layer.name}.{name}.bias"] = bias
        else:
            for key, t in _layer_blocks(layer, plans, states, weights, cross).items():
                out[f"{layer.name}.{key}"] = t
        covered.update(f"{layer.name}.{p}" for p in ("weight", "bias", "gain"))
        rows = layout(layer.out_axis, plans) if per_unit else None
        for module, p in per_unit:
            key = f"{module}.{p}"
            if key in first:
                out[key] = rows.combine([state[key] for state in states], weights)
        if layer.norm:
            covered.update(k for k in first if k.startswith(f"{layer.norm}."))
            if f"{layer.norm}.num_batches_tracked" in first:
                out[f"{layer.norm}.num_batches_tracked"] = first[f"{layer.norm}.num_batches_tracked"]
    norms = {n.name for n in spec.norms}
    per_unit = [(key, spec.axes[key][0], 0) for key in first if key.rpartition(".")[0] in norms]
    for key, axis, dim in per_unit + [(v.key, v.axis, v.dim) for v in spec.vectors]:
        out[key] = layout(axis, plans).combine([state[key] for state in states], weights, dim)
    for heads in spec.heads:  # per-head tables (a relative position bias) follow the merged attention's heads
        at = head_layout(heads, partition)
        for key, dim in heads.tables:
            out[key] = at.combine([state[key] for state in states], weights, dim)
    for key, t in first.items():  # tensors with no units (EVA's q bias, whose dims rotary fixes) interpolate
        if key not in covered and key not in out:
            out[key] = _interpolated([state[key] for state in states], weights)
    return out


def _interpolated(tensors: list[torch.Tensor], weights: Weights) -> torch.Tensor:
    """Σ_i w_i·t_i (``(1−α)·A + α·B``) for a float tensor; A's for an integer buffer (a BatchNorm's batch
    count)."""
    if not tensors[0].is_floating_point():
        return tensors[0]
    out = weights[0] * tensors[0]
    for w, t in zip(weights[1:], tensors[1:]):
        out = out + w * t
    return out


def full_merge_state(spec: PermutationSpec, plans: dict[str, GroupPlan], state_a: dict, state_b: dict,
                     alpha: float) -> dict[str, torch.Tensor]:
    """The state of a full merge (γ=0 everywhere) in the plain architecture: both endpoints permuted into
    the shared order along every axis of the spec, then interpolated (integer buffers from A)."""
    pa = permute_state(spec, state_a, {g: p.shared_a for g, p in plans.items()})
    pb = permute_state(spec, state_b, {g: p.shared_b for g, p in plans.items()})
    return {k: _interpolated([v, pb[k]], (1 - alpha, alpha)) for k, v in pa.items()}


def build(spec: PermutationSpec, plans: dict[str, GroupPlan] | Matchings, model_a: nn.Module,
          model_b: nn.Module, *more: nn.Module, architecture: str, model_args: dict, alpha: float = 0.5,
          cross: str = "interpolate", weights: list[float] | None = None, **config) -> PartialMergedModel:
    """The partitioned merged model for ``plans`` (γ=0 everywhere gives the ordinary full merge), or the
    matched one for :class:`~hubmerge.matching.Matching` s (an N-way full merge of ``model_a``, ``model_b``
    and ``more`` weighted by ``weights``, laid out like a γ=0 merge; a zip is the partial plans of its virtual
    endpoints, :func:`hubmerge.zipit.virtual`). Plans of N endpoints (an N-way partial merge) weigh them by
    ``weights`` too; two weigh ``1−α`` and ``α``."""
    if cross not in CROSS_RULES:
        raise UsageError(f"unknown cross-block rule {cross!r}; choose one of {CROSS_RULES}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must be in [0, 1], got {alpha}")
    if is_matching(plans):
        state = matched_state(spec, plans, [model_a, model_b, *more], tuple(weights or (1 - alpha, alpha)))
        if spec.partial is None:  # the partitioned layout of a full merge holds the plain state as it is (α=0: A's)
            same = {g: GroupPlan.merged(grp.width) for g, grp in spec.groups.items()}
            state = merged_state(spec, same, [state, state], (1.0, 0.0), "interpolate")
    elif spec.partial is None:
        states = [m.state_dict() for m in (model_a, model_b, *more)]
        if any(p.models != len(states) for p in plans.values()):
            raise UsageError(f"plans of {next(iter(plans.values())).models} endpoints, given {len(states)} models")
        state = merged_state(spec, plans, states, tuple(weights) if weights else (1 - alpha, alpha), cross)
    else:  # only full merges: the plain architecture holds them
        state = full_merge_state(spec, plans, model_a.state_dict(), model_b.state_dict(), alpha)
    partition = {g: list(p.sizes) for g, p in plans.items()}
    dtype = next(model_a.parameters()).dtype
    model = PartialMergedModel(architecture, model_args, partition, alpha=alpha, cross=cross, weights=weights,
                               **config)
    model.to(dtype).net.load_state_dict(state, strict=True)
    return model.to(next(model_a.parameters()).device)
