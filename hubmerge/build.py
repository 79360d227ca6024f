"""Build the merged weights from the endpoints and a plan per group (method §4's table).

For each layer (rows = output group sections, columns = input group sections):

    rows \\ cols   A-only in      shared in                 B-only in
    A-only out    W_A            W_A                       (not stored)
    shared out    c_A·W_A        (1−α)·W_A + α·P(W_B)      c_B·P(W_B)
    B-only out    (not stored)   P(W_B)                    P(W_B)

with ``c_A, c_B = 1−α, α`` for ``cross="interpolate"`` and ``1, 1`` for ``cross="fill"`` (the logits layer
always interpolates). Biases and norms: A-only from A, B-only from B, shared interpolated.

Each axis of a layer is its segments one after the other, each laid out so (:func:`~hubmerge.partial.layout`):
most layers map one group to one group, a fused ``qkv`` projection holds q, k and v of every head, a grouped
conv's weight holds one block's input axis and every block's outputs (each block laid out on its own). The table
is stored as the blocks of :class:`~hubmerge.partitioned.PartitionedLayer`: ``a_side`` (the top-left 2×2),
``shared_from_b`` (shared rows × B-only columns) and ``b_only`` (B-only rows × shared and B-only columns),
with rows and columns in section order, or one ``whole`` block where the layer has no zero block.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .partial import GroupPlan, Layout, head_layout, layout, sections
from .partitioned import SECTIONS, BlockLayout, PartialMergedModel
from .spec import Layer, PermutationSpec, permute_state
from .matching import Matchings, is_matching, matched_state

CROSS_RULES = ("interpolate", "fill")


def _wide(layer: Layer, plans: dict[str, GroupPlan], sa: dict, sb: dict, alpha: float, cross: str
          ) -> tuple[torch.Tensor, torch.Tensor | None, Layout, Layout]:
    """The layer's wide weight (zero blocks included) and bias in the merged order of its axes, with the
    layouts of its output and input axes."""
    wa, wb = sa[f"{layer.name}.weight"], sb[f"{layer.name}.weight"]
    ba, bb = sa.get(f"{layer.name}.bias"), sb.get(f"{layer.name}.bias")
    rows, cols = layout(layer.out_axis, plans), layout(layer.in_axis, plans)
    # coefficients of A's and B's weights per (row kind, column section): the table in the module docstring;
    # row kind 3 is the logits (fixed rows), which always interpolate their cross blocks
    # a weight-standardised conv stores A's and B's own weights in its cross blocks: it standardises each
    # endpoint's view of its inputs and applies the rule to the standardised views (PartitionedStdConv)
    c_a, c_b = (1 - alpha, alpha) if cross == "interpolate" and not layer.standardised else (1.0, 1.0)
    from_a = ((1.0, 1.0, 0.0), (c_a, 1 - alpha, 0.0), (0.0, 0.0, 0.0), (1 - alpha, 1 - alpha, 0.0))
    from_b = ((0.0, 0.0, 0.0), (0.0, alpha, c_b), (0.0, 1.0, 1.0), (0.0, alpha, alpha))
    kind = torch.where(rows.fixed, 3, rows.section)
    weight = wa.new_zeros(len(kind), len(cols.section), *wa.shape[2:])
    for r in range(4):
        ri = torch.nonzero(kind == r).flatten()
        for c in range(3):
            ci = torch.nonzero(cols.section == c).flatten()
            if not len(ri) or not len(ci) or from_a[r][c] == from_b[r][c] == 0.0:
                continue
            block = 0.0
            if from_a[r][c]:
                block = from_a[r][c] * wa.index_select(0, rows.a[ri]).index_select(1, cols.a[ci])
            if from_b[r][c]:
                block = block + from_b[r][c] * wb.index_select(0, rows.b[ri]).index_select(1, cols.b[ci])
            weight[ri[:, None], ci[None, :]] = block
    bias = None if ba is None else rows.combine(ba, bb, alpha)
    return weight, bias, rows, cols


def _layer_blocks(layer: Layer, plans: dict[str, GroupPlan], sa: dict, sb: dict, alpha: float, cross: str
                  ) -> dict[str, torch.Tensor]:
    """The stored tensors of one partitioned layer (keys relative to the layer): its wide weight cut into the
    blocks of its :class:`~hubmerge.partitioned.BlockLayout`, which leave out the zero blocks."""
    weight, bias, rows, cols = _wide(layer, plans, sa, sb, alpha, cross)
    blocks = BlockLayout.of(rows.section, cols.section, layer.blocks)
    out = {}
    if layer.standardised:  # per-unit gain and bias of every row, in the natural order
        out["gain"] = rows.combine(sa[f"{layer.name}.gain"], sb[f"{layer.name}.gain"], alpha)
        if bias is not None:
            out["bias"], bias = bias, None
    for block in blocks.extent:
        r = blocks.rows(block)
        out[f"{block}.weight"] = weight[r][:, blocks.cols(block)]
        if bias is not None and block != "shared_from_b":  # shared rows take their bias from a_side
            out[f"{block}.bias"] = bias[r]
    return out


def merged_state(spec: PermutationSpec, plans: dict[str, GroupPlan], state_a: dict, state_b: dict,
                 alpha: float, cross: str) -> dict[str, torch.Tensor]:
    """The partitioned state dict of the merged network (keys as in ``PartialMergedModel.net``)."""
    out: dict[str, torch.Tensor] = {}
    covered = set()
    partition = {g: p.sizes for g, p in plans.items()}
    across = {a.layer: sections(a.axis, partition) for a in spec.across}
    for layer in spec.layers:
        per_unit = [(layer.norm, p) for p in ("weight", "bias", "running_mean", "running_var") if layer.norm]
        passing = across.get(layer.name)
        if layer.depthwise:  # one filter per unit: laid out like a norm's parameters
            per_unit += [(layer.name, p) for p in ("weight", "bias", "gain")]
        elif passing is not None and (passing != 1).any():  # a copy per section of the units passing by
            for section, (name, at) in enumerate(zip(SECTIONS, (0.0, alpha, 1.0))):
                if (passing == section).any():  # (its own groups keep their width: one block, A's, merged, B's)
                    weight, bias, _, _ = _wide(layer, plans, state_a, state_b, at, cross)
                    out[f"{layer.name}.{name}.weight"] = weight
                    if bias is not None:
                        out[f"{layer.name}.{name}.bias"] = bias
        else:
            for key, t in _layer_blocks(layer, plans, state_a, state_b, alpha, cross).items():
                out[f"{layer.name}.{key}"] = t
        covered.update(f"{layer.name}.{p}" for p in ("weight", "bias", "gain"))
        rows = layout(layer.out_axis, plans) if per_unit else None
        for module, p in per_unit:
            key = f"{module}.{p}"
            if key in state_a:
                out[key] = rows.combine(state_a[key], state_b[key], alpha)
        if layer.norm:
            covered.update(k for k in state_a if k.startswith(f"{layer.norm}."))
            if f"{layer.norm}.num_batches_tracked" in state_a:
                out[f"{layer.norm}.num_batches_tracked"] = state_a[f"{layer.norm}.num_batches_tracked"]
    norms = {n.name for n in spec.norms}
    per_unit = [(key, spec.axes[key][0], 0) for key in state_a if key.rpartition(".")[0] in norms]
    for key, axis, dim in per_unit + [(v.key, v.axis, v.dim) for v in spec.vectors]:
        out[key] = layout(axis, plans).combine(state_a[key], state_b[key], alpha, dim)
    for heads in spec.heads:  # per-head tables (a relative position bias) follow the merged attention's heads
        at = head_layout(heads, partition)
        for key, dim in heads.tables:
            out[key] = at.combine(state_a[key], state_b[key], alpha, dim)
    for key, t in state_a.items():  # tensors with no units (EVA's q bias, whose dims rotary fixes) interpolate
        if key not in covered and key not in out:
            out[key] = _interpolated(t, state_b[key], alpha)
    return out


def _interpolated(ta: torch.Tensor, tb: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1−α)·A + α·B for a float tensor; A's for an integer buffer (a BatchNorm's batch count)."""
    return (1 - alpha) * ta + alpha * tb if ta.is_floating_point() else ta


def full_merge_state(spec: PermutationSpec, plans: dict[str, GroupPlan], state_a: dict, state_b: dict,
                     alpha: float) -> dict[str, torch.Tensor]:
    """The state of a full merge (γ=0 everywhere) in the plain architecture: both endpoints permuted into
    the shared order along every axis of the spec, then interpolated (integer buffers from A)."""
    pa = permute_state(spec, state_a, {g: p.shared_a for g, p in plans.items()})
    pb = permute_state(spec, state_b, {g: p.shared_b for g, p in plans.items()})
    return {k: _interpolated(v, pb[k], alpha) for k, v in pa.items()}


def build(spec: PermutationSpec, plans: dict[str, GroupPlan] | Matchings, model_a: nn.Module,
          model_b: nn.Module, *more: nn.Module, architecture: str, model_args: dict, alpha: float = 0.5,
          cross: str = "interpolate", weights: list[float] | None = None, **config) -> PartialMergedModel:
    """The partitioned merged model for ``plans`` (γ=0 everywhere gives the ordinary full merge), or the
    matched one for :class:`~hubmerge.matching.Matching` s (an N-way merge of ``model_a``, ``model_b`` and
    ``more`` weighted by ``weights``: a full merge, laid out like a γ=0 merge; a zip is the partial plans of
    its virtual endpoints, :func:`hubmerge.zipit.virtual`)."""
    if cross not in CROSS_RULES:
        raise UsageError(f"unknown cross-block rule {cross!r}; choose one of {CROSS_RULES}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must be in [0, 1], got {alpha}")
    if is_matching(plans):
        state = matched_state(spec, plans, [model_a, model_b, *more], tuple(weights or (1 - alpha, alpha)))
        if spec.partial is None:  # the partitioned layout of a full merge holds the plain state as it is (α=0: A's)
            same = {g: GroupPlan.merged(grp.width) for g, grp in spec.groups.items()}
            state = merged_state(spec, same, state, state, 0.0, "interpolate")
    elif spec.partial is None:
        state = merged_state(spec, plans, model_a.state_dict(), model_b.state_dict(), alpha, cross)
    else:  # only full merges: the plain architecture holds them
        state = full_merge_state(spec, plans, model_a.state_dict(), model_b.state_dict(), alpha)
    partition = {g: list(p.sizes) for g, p in plans.items()}
    dtype = next(model_a.parameters()).dtype
    model = PartialMergedModel(architecture, model_args, partition, alpha=alpha, cross=cross, weights=weights,
                               **config)
    model.to(dtype).net.load_state_dict(state, strict=True)
    return model.to(next(model_a.parameters()).device)
