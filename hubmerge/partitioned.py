"""The partitioned merged model (method §4, thesis App. B).

Every conv/linear of the base architecture becomes a :class:`PartitionedLayer` that stores and runs only
the non-zero part of the equivalent wide layer. With rows (outputs) and columns (inputs) in the layout
``[A-only | shared | B-only]``, the zero blocks are A-only rows × B-only columns and B-only rows × A-only
columns; the rest is covered by three dense blocks on contiguous slices:

    block          rows                 columns (input slice)
    a_side         [A-only | shared]    [A-only | shared]
    shared_from_b  shared               B-only
    b_only         B-only               [shared | B-only]

A grouped conv (ResNeXt, RegNet) lays out each of its blocks so and stores the same three blocks as grouped
convs of as many blocks (:class:`BlockLayout`). ``a_side`` has A's shape, so the bulk of the work runs as
one full-width op: measured on CPU this is faster than the thesis's row split (A-only rows, shared rows,
B-only rows), whose two thin A-only/B-only convolutions each read a whole input slice. ``shared_from_b``
adds into the shared rows; ``b_only`` is concatenated. A layer with no zero block (its input or output group
fully merged, or the fixed input/logits) is stored and run as one block, ``whole``: splitting it would only
add ops, and joining blocks into one weight on every forward costs a weight copy per call (measured at batch
1 on a VGG11 merge with half its groups fully merged: 24 ms joined, 14 ms whole). At inference a layer may
instead run as one zero-padded op joined from its blocks, or the whole model as its plain zero-padded copy
(:meth:`PartialMergedModel.plan_execution` times the forms and keeps the fastest; storage stays
partitioned). A weight-standardised conv becomes a
:class:`PartitionedStdConv`, which standardises each endpoint's view of its inputs. BatchNorms become
per-unit norms of the wider group, LayerNorms over widened groups :class:`PartitionedNorm` s, per-unit vectors
(layer scales) widen, and so do per-head tables (a relative position bias) where heads are kept apart. A layer
run along another axis than a widened group passing it by (a token-mixing MLP) becomes a
:class:`SectionwiseLayer`, one copy per section of that group.
The rest of the architecture (activations, pooling, residual adds) is the base model's own code.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from timm.layers import Conv2dSame, pad_same
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from . import __version__
from .arch_specs import build_model, spec_for
from .arch_specs.attention import HEAD_COUNTS, run_wide
from .errors import CheckpointError, UsageError
from .hub import load_checkpoint
from .partial import (SHARED, Sizes, Weights, block_weights, combine_weights, endpoint_names, own, owner, padded,
                      sections)
from .spec import Layer
from .trace import STANDARDISED
from .tasks import Task, union_labels

Extent = tuple[tuple[int, int], tuple[tuple[int, int], ...]]  # (first row, end row), its column ranges


def block_extents(out_sizes: Sizes, in_sizes: Sizes) -> dict[str, Extent]:
    """Where each stored block sits in the wide layer: ((first row, end row), column ranges), each column
    range (first column, end column).

    ``in_sizes`` count input entries (a flattened group's sizes times its repeat). Zero blocks are one
    endpoint's own rows × another's own columns (A-only × B-only and B-only × A-only for two); where none
    exists the layer is one block. ``a_side`` covers A's rows and columns (A-only and shared), then per
    further endpoint (``b``, ``c``, …) ``shared_from_b`` its own columns into the shared rows and ``b_only`` its
    own rows, reading the shared and its own columns (two ranges apart for the third endpoint on).
    """
    count = max(len(out_sizes), len(in_sizes))
    out_sizes, in_sizes = padded(out_sizes, count), padded(in_sizes, count)
    own_sections = [own(i) for i in range(count - 1)]
    rows, cols = sum(out_sizes), sum(in_sizes)
    if not any(out_sizes[j] and in_sizes[k] for j in own_sections for k in own_sections if j != k):
        return {"whole": ((0, rows), ((0, cols),))}
    row_at = [sum(out_sizes[:s]) for s in range(count + 1)]
    col_at = [sum(in_sizes[:s]) for s in range(count + 1)]

    def span(at: list[int], *sections: int) -> list[tuple[int, int]]:  # adjacent sections' ranges joined
        out: list[tuple[int, int]] = []
        for s in sections:
            if out and out[-1][1] == at[s]:
                out[-1] = (out[-1][0], at[s + 1])
            else:
                out.append((at[s], at[s + 1]))
        return out

    extent = {"a_side": (span(row_at, 0, SHARED)[0], tuple(span(col_at, 0, SHARED)))}
    for name, s in zip(endpoint_names(count - 1)[1:], own_sections[1:]):
        extent[f"shared_from_{name}"] = ((row_at[SHARED], row_at[SHARED + 1]), tuple(span(col_at, s)))
        extent[f"{name}_only"] = ((row_at[s], row_at[s + 1]), tuple(span(col_at, SHARED, s)))
    return {b: e for b, e in extent.items() if e[0][1] > e[0][0] and sum(c1 - c0 for c0, c1 in e[1])}


@dataclass(frozen=True)
class BlockLayout:
    """How a partitioned layer stores its wide weight: the orders of its rows and columns, the sections'
    sizes and the extent of every stored block (:func:`block_extents`).

    Blocks need each section contiguous, so where an axis interleaves sections (a fused ``qkv`` projection
    holds q, k and v of every head, each head merged or kept apart) its positions are stored sorted by section
    (stably): ``out_order`` / ``in_order`` give the natural position of every stored row / column (None: the
    natural order). A layer stored as one block keeps the natural order. A grouped conv (``groups`` > 1) keeps
    it too: each of its blocks is laid out ``[A-only | shared | B-only]`` on its own, every stored block is a
    grouped conv of the same blocks, and the sizes and extents are one block's (the input's are the weight's
    input axis, which is one block's)."""

    out_order: torch.Tensor | None
    in_order: torch.Tensor | None
    out_sizes: Sizes
    in_sizes: Sizes
    groups: int
    extent: dict[str, Extent]

    @classmethod
    def of(cls, out_sections: torch.Tensor, in_sections: torch.Tensor, groups: int = 1) -> BlockLayout:
        """The layout of a layer whose wide weight has rows and columns in sections ``out_sections`` and
        ``in_sections`` (:func:`~hubmerge.partial.own`: 0 A-only, 1 shared, 2 B-only, …)."""
        per_block = out_sections.view(groups, -1)
        count = max(3, int(out_sections.max()) + 1, int(in_sections.max()) + 1)
        sizes = [tuple(torch.bincount(sec, minlength=count).tolist()) for sec in (per_block[0], in_sections)]
        orders = [torch.argsort(sec, stable=True) for sec in (out_sections, in_sections)]
        extent = block_extents(sizes[0], sizes[1])
        if groups > 1:
            ordered = [bool((torch.diff(sec) >= 0).all()) for sec in (*per_block, in_sections)]
            if not all(ordered) or not bool((per_block == per_block[0]).all()):
                raise UsageError("a grouped conv's blocks must each be laid out [A-only | shared | B-only] alike")
        if "whole" in extent or groups > 1:
            orders = [torch.arange(len(out_sections)), torch.arange(len(in_sections))]
        natural = [None if torch.equal(o, torch.arange(len(o))) else o for o in orders]
        return cls(natural[0], natural[1], sizes[0], sizes[1], groups, extent)

    def rows(self, block: str) -> torch.Tensor:
        """The natural output positions of a stored block's rows, in the order it stores them (block by block
        for a grouped conv)."""
        (r0, r1), _ = self.extent[block]
        rows = torch.arange(r0, r1)
        if self.groups > 1:
            rows = (torch.arange(self.groups)[:, None] * sum(self.out_sizes) + rows).reshape(-1)
        return rows if self.out_order is None else self.out_order[rows]

    def cols(self, block: str) -> torch.Tensor:
        """The natural positions, along the weight's input axis, of a stored block's columns."""
        cols = torch.cat([torch.arange(c0, c1) for c0, c1 in self.extent[block][1]])
        return cols if self.in_order is None else self.in_order[cols]


def _like(template: nn.Module, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A layer of the template's type and hyper-parameters with the given widths (per block, for a grouped
    conv, which keeps its number of blocks)."""
    if isinstance(template, Conv2dSame):  # pads at run time (its padding is 0), with zeros
        g = template.groups
        return Conv2dSame(in_features * g, out_features * g, template.kernel_size, template.stride, 0,
                          template.dilation, groups=g, bias=bias)
    if isinstance(template, nn.Conv2d):
        g = template.groups
        return nn.Conv2d(in_features * g, out_features * g, template.kernel_size, template.stride, template.padding,
                         template.dilation, groups=g, bias=bias, padding_mode=template.padding_mode)
    return nn.Linear(in_features, out_features, bias=bias)


class PartitionedLayer(nn.Module):
    """A conv/linear layer stored and executed as its non-zero blocks (see the module docstring).

    ``out_sections`` / ``in_sections``: the section (0 A-only, 1 shared, 2 B-only) of every output row and
    input column of the wide layer. Where an axis interleaves sections (heads of a fused ``qkv``), the blocks
    hold its positions in section order: the input is gathered into that order first, the output scattered
    back after (one copy each; :meth:`PartialMergedModel.plan_execution` may run the layer dense instead). A
    grouped conv's blocks (:class:`BlockLayout`) cut every block of its input and output alike.
    """

    def __init__(self, template: nn.Module, out_sections: torch.Tensor, in_sections: torch.Tensor,
                 block_bias: bool = True):
        super().__init__()
        groups = template.groups if isinstance(template, nn.Conv2d) else 1
        self.layout = BlockLayout.of(out_sections, in_sections, groups)
        self.unit_dim = 1 if isinstance(template, nn.Conv2d) else -1  # a Linear acts on the last dim
        self.width_in = len(in_sections)
        # orders as non-persistent buffers: they follow the model's device, and the state holds the blocks only
        out_order, in_order = self.layout.out_order, self.layout.in_order
        self.register_buffer("out_order", out_order, persistent=False)
        self.register_buffer("out_inverse", None if out_order is None else torch.argsort(out_order), persistent=False)
        self.register_buffer("in_order", in_order, persistent=False)
        bias = template.bias is not None and block_bias
        for block, ((r0, r1), cols) in self.layout.extent.items():
            width = sum(c1 - c0 for c0, c1 in cols)
            self.add_module(block, _like(template, width, r1 - r0, bias and not block.startswith("shared_from_")))
        self.execution = "blocks"  # or "dense" (see :meth:`PartialMergedModel.plan_execution`)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The present sub-layers, ``whole`` alone or in the order ``a_side``, ``shared_from_b``, ``b_only``
        (``shared_from_c``, ``c_only``, …); the first one carries the bias of every row it covers."""
        return [(b, getattr(self, b)) for b in self.layout.extent]

    def scaled_rows(self) -> list[tuple[nn.Module, torch.Tensor]]:
        """The sub-layers whose weight rows scale the layer's outputs and whose biases shift them (where REPAIR
        folds its corrections), each with the natural output positions of its rows."""
        return [(sub, self.layout.rows(block)) for block, sub in self.blocks()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "dense" and not torch.is_grad_enabled() and not hasattr(self, "whole"):
            return self._dense().forward(x)  # (its hooks machinery is not needed: it is never hooked)
        if self.in_order is not None:
            x = x.index_select(self.unit_dim, self.in_order)
        out = self._blocks(x, lambda block, t: getattr(self, block)(t))
        return out if self.out_inverse is None else out.index_select(self.unit_dim, self.out_inverse)

    def _blocks(self, x: torch.Tensor, run) -> torch.Tensor:
        """The blocks on an input in section order (``run(block, input)`` applies one); the output in section
        order. Slices are taken along the unit dim, or for a grouped conv along each of its blocks (a view with
        the blocks as one more dim)."""
        if hasattr(self, "whole"):
            return run("whole", x)
        d, g = self.unit_dim, self.layout.groups
        at = d + 1 if g > 1 else d  # the dim of units within a block

        def blocked(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(d, (g, -1)) if g > 1 else t

        def joined(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(d, d + 1) if g > 1 else t

        x = blocked(x)

        def taken(ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:  # a block's input columns
            parts = [x.narrow(at, c0, c1 - c0) for c0, c1 in ranges]
            return joined(parts[0] if len(parts) == 1 else torch.cat(parts, at))

        out, own_rows = None, []
        for block, ((r0, r1), cols) in self.layout.extent.items():
            y = run(block, taken(cols))
            if out is None:  # a_side: every endpoint's shared rows start in its output
                out = y
            elif block.startswith("shared_from_"):
                blocked(out).narrow(at, r0, r1 - r0).add_(blocked(y))
            else:
                own_rows.append(blocked(y))
        return joined(torch.cat([blocked(out), *own_rows], at)) if own_rows else out

    def _cached(self, slot: str, make):
        """``make()``, made again whenever one of the layer's tensors changed: REPAIR folds corrections in
        place, ``load_state_dict`` copies into them, ``.to`` gives them new storage, and each of these changes a
        tensor's version or address (the check costs a few µs per call). A cache, not state."""
        key = [(t.data_ptr(), t._version) for t in self.parameters()]
        held = self.__dict__.get(slot)
        if held is None or held[0] != key:
            self.__dict__[slot] = held = (key, make())
        return held[1]

    def _dense(self) -> nn.Module:
        """The zero-padded layer joined from the blocks (:meth:`dense`), cached."""
        return self._cached("_joined", self.dense)

    def wide_weight(self) -> torch.Tensor:
        """The stored blocks' weights in the wide layer's natural order, zero blocks included."""
        w = self.blocks()[0][1].weight
        out = w.new_zeros(sum(self.layout.out_sizes) * self.layout.groups, self.width_in, *w.shape[2:])
        for block, module in self.blocks():
            r, c = self.layout.rows(block).to(w.device), self.layout.cols(block).to(w.device)
            out[r[:, None], c[None, :]] = module.weight
        return out

    def dense(self) -> nn.Module:
        """The equivalent plain layer, zero blocks included (for inspection and export)."""
        template = self.blocks()[0][1]
        w = template.weight
        out = _like(template, self.width_in, sum(self.layout.out_sizes), template.bias is not None)
        out = out.to(w.device, w.dtype)
        with torch.no_grad():
            out.weight.copy_(self.wide_weight())
            for block, module in self.blocks():
                if module.bias is not None:
                    out.bias[self.layout.rows(block).to(w.device)] = module.bias
        return out


class PartitionedStdConv(PartitionedLayer):
    """A weight-standardised conv (timm's ``ScaledStdConv2d``, NF-Nets) stored as blocks of raw weights, with
    its per-unit gain and bias in the natural order of its rows.

    Each endpoint standardises a unit's weights over its own inputs (mean 0, variance 1 over the fan-in, times
    ``gain · γ/√fan-in``), so every row is standardised over the A-view of its columns (A-only and shared) and
    over the B-view (shared and B-only) on its own (and over each further endpoint's view), each as wide as the
    endpoints' fan-in. A-only rows take the A-view, B-only rows the B-view, and shared rows combine the two as
    the build table combines A's and B's weights: ``c_A``·A-view on A-only columns, ``(1−α)``·A-view +
    ``α``·B-view on shared ones, ``c_B``·B-view on B-only ones (``c_A, c_B = 1−α, α`` for
    ``cross="interpolate"``, ``1, 1`` for ``"fill"``; the stored shared rows hold A's raw weights on A-only columns and B's on B-only ones). With no input apart both views
    are the whole row: the plain layer on the interpolated raw weights, as timm computes a full merge; with
    nothing shared each endpoint's own layer (the ensemble); at α=0 A's. REPAIR scales the outputs through the
    gain (scaling a standardised weight changes nothing)."""

    def __init__(self, template: nn.Module, out_sections: torch.Tensor, in_sections: torch.Tensor, weights: Weights,
                 cross: str):
        super().__init__(template, out_sections, in_sections, block_bias=False)
        self.scale, self.eps = template.scale, template.eps
        self.same_pad = getattr(template, "same_pad", False)
        rows = len(out_sections)
        self.gain = nn.Parameter(template.gain.new_empty(rows, *template.gain.shape[1:]))
        self.bias = None if template.bias is None else nn.Parameter(template.bias.new_empty(rows))
        per_view = block_weights(weights, weights if cross == "interpolate" else (1.0,) * len(weights))
        # per view (A, B, …): each (row, column)'s weight on the view's standardised row, and the view's columns
        self.register_buffer("view_weights", per_view[:, out_sections][:, :, in_sections], persistent=False)
        self.register_buffer("views", torch.stack([(in_sections == own(i)) | (in_sections == SHARED)
                                                   for i in range(len(weights))]), persistent=False)
        self.single_view = bool((in_sections == 1).all())
        view = copy.deepcopy(template)
        for name in ("weight", "bias", "gain"):
            view.register_parameter(name, None)
        self.__dict__["view"] = view  # hyper-parameters only: not a submodule, it holds no tensors

    def scaled_rows(self) -> list[tuple[nn.Module, torch.Tensor]]:
        return [(self, torch.arange(len(self.gain)))]

    def standardised(self) -> torch.Tensor:
        """The wide standardised weight in natural order (the weight the layer computes with)."""
        w = self.wide_weight()
        out = torch.zeros_like(w)
        for columns, weight in zip(self.views, self.view_weights):
            mask = columns.view(1, -1, *([1] * (w.dim() - 2))).to(w)
            n = mask.sum() * w[0, 0].numel()
            mean = (w * mask).sum(tuple(range(1, w.dim())), keepdim=True) / n
            var = ((w - mean) * mask).square().sum(tuple(range(1, w.dim())), keepdim=True) / n
            out = out + weight.to(w).view(*weight.shape, *([1] * (w.dim() - 2))) * (w - mean) * mask \
                * torch.rsqrt(var + self.eps)
        return out * (self.gain * self.scale)

    def _block_weights(self) -> dict[str, torch.Tensor]:
        e = self.standardised()
        return {b: e[self.layout.rows(b).to(e.device)][:, self.layout.cols(b).to(e.device)] for b in self.layout.extent}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "dense" and not torch.is_grad_enabled() and not hasattr(self, "whole"):
            return self._dense().forward(x)
        weights = self._block_weights() if torch.is_grad_enabled() else self._cached("_standardised",
                                                                                     self._block_weights)
        v = self.view
        if self.same_pad:
            x = pad_same(x, v.kernel_size, v.stride, v.dilation)
        if self.in_order is not None:
            x = x.index_select(1, self.in_order)
        out = self._blocks(x, lambda block, t: F.conv2d(t, weights[block], None, v.stride, v.padding, v.dilation,
                                                        self.layout.groups))
        out = out if self.out_inverse is None else out.index_select(1, self.out_inverse)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def dense(self) -> nn.Module:
        """The equivalent plain layer: where no input is apart, the template's type on the wide raw weights
        (a full merge is timm's own layer), else a plain conv holding the standardised weight."""
        w = self.wide_weight()
        if self.single_view:
            out = copy.deepcopy(self.view)
            out.weight, out.gain = nn.Parameter(w.detach().clone()), nn.Parameter(self.gain.detach().clone())
            out.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
            out.in_channels, out.out_channels = w.shape[1] * self.layout.groups, w.shape[0]
            return out
        v = self.view
        plain = Conv2dSame if self.same_pad else nn.Conv2d
        out = plain(w.shape[1] * v.groups, w.shape[0], v.kernel_size, v.stride, 0 if self.same_pad else v.padding,
                    v.dilation, groups=v.groups, bias=self.bias is not None).to(w.device, w.dtype)
        with torch.no_grad():
            out.weight.copy_(self.standardised())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def output_scale(module: nn.Module) -> torch.Tensor:
    """The tensor whose rows scale a layer's outputs: a weight-standardised conv's gain (scaling weights that
    are standardised changes nothing), else its weight."""
    return module.gain if isinstance(module, (PartitionedStdConv, *STANDARDISED)) else module.weight


def copy_names(models: int) -> tuple[str, ...]:
    """The names of a :class:`SectionwiseLayer`'s copies, one per section: ``of_a``, ``merged``, ``of_b``
    (``of_c``, … for more endpoints)."""
    names = endpoint_names(models)
    return tuple("merged" if s == SHARED else f"of_{names[owner(s)]}" for s in range(models + 1))


class SectionwiseLayer(nn.Module):
    """A layer applied along another dim than the units passing it by (:class:`~hubmerge.spec.Across`: a
    token-mixing MLP, the same weights for every channel), where those units widen: each section of them runs
    its own copy of the layer on its positions along ``dim`` of the input, as each endpoint ran its own:
    ``of_a`` (A's layer) on A-only units, ``merged`` (the merged one) on shared ones, ``of_b`` (B's) on
    B-only ones (``of_c``, … for more endpoints). At γ=1 there is no shared section, so the layer is the
    endpoints' side by side."""

    def __init__(self, template: nn.Module, sections: torch.Tensor, dim: int, models: int = 2):
        super().__init__()
        self.dim = dim
        self.unit_dim = 1 if isinstance(template, nn.Conv2d) else -1  # where its own outputs hold units
        order = torch.argsort(sections, stable=True)
        natural = torch.equal(order, torch.arange(len(order)))  # one segment: the sections lie in order
        self.register_buffer("order", None if natural else order, persistent=False)
        self.register_buffer("inverse", None if natural else torch.argsort(order), persistent=False)
        self.sizes = tuple(torch.bincount(sections, minlength=models + 1).tolist())
        self.names = copy_names(models)
        for name, n in zip(self.names, self.sizes):
            if n:
                self.add_module(name, copy.deepcopy(template))

    def copies(self) -> list[tuple[str, nn.Module, int]]:
        """The present copies in section order, each with its section's width."""
        return [(name, getattr(self, name), n) for name, n in zip(self.names, self.sizes) if n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            x = x.index_select(self.dim, self.order)
        parts, start = [], 0
        for _, copy_, n in self.copies():
            parts.append(copy_(x.narrow(self.dim, start, n)))
            start += n
        out = torch.cat(parts, self.dim)
        return out if self.inverse is None else out.index_select(self.dim, self.inverse)


class PartitionedNorm(nn.Module):
    """A norm over widened groups along ``dim``: any module whose only interaction between units is a
    normalisation over its axis (LayerNorm, GroupNorm(1), ConvNeXt-V2's GRN) and whose parameters are per-unit
    vectors. ``sections``: the section (0 A-only, 1 shared, 2 B-only, … :func:`~hubmerge.partial.own`) of every
    position of that axis, one group laid out ``[A-only | shared | B-only]``, or several segments each laid out
    so (Swin's patch merging normalises the channels of 2×2 neighbours together).

    Each endpoint normalises its own units, so the A-view (the A-only and shared positions) and the B-view
    (shared and B-only), both of the endpoints' width, each run through the original module with that view's
    entries of the merged per-unit parameters; A-only units take the A-view's output, B-only units the
    B-view's, shared units ``(1−α)·A-view + α·B-view`` (for N endpoints weighted ``w_i``: a view per endpoint,
    shared units ``Σ_i w_i·view_i``). With nothing shared this is each endpoint's norm on its own units (the
    ensemble); a fully merged group keeps the plain module, the full merge's norm. The merged parameters are
    stored under the module's own names; the module itself is kept without them. Two endpoints' views of one
    group are slices; other views are gathered and the outputs scattered back.
    """

    def __init__(self, template: nn.Module, sections: torch.Tensor, dim: int, weights: Weights):
        super().__init__()
        self.dim, self.weights = dim, tuple(weights)
        self.sizes = tuple(torch.bincount(sections, minlength=len(weights) + 1).tolist())
        sliced = len(weights) == 2 and bool((torch.diff(sections) >= 0).all())
        self.gathered = not sliced
        if self.gathered:  # per view: its positions, and each position's weight on it
            for i in range(len(weights)):
                index = torch.nonzero((sections == own(i)) | (sections == SHARED)).flatten()
                self.register_buffer(f"view_{i}", index, persistent=False)
            self.register_buffer("view_weights", torch.stack(combine_weights(sections, weights, torch.float64)),
                                 persistent=False)
        view = copy.deepcopy(template)
        for name, t in list(template.named_parameters(recurse=False)):
            view.register_parameter(name, None)
            self.register_parameter(name, nn.Parameter(t.new_empty(len(sections)), t.requires_grad))
        self.__dict__["view"] = view  # not a submodule: it holds no tensors, and the state keeps the template's keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gathered:
            return self._gathered(x)
        ka, m, kb = self.sizes
        d, (wa, wb) = self.dim, self.weights

        def run(start: int) -> torch.Tensor:
            params = {name: p.narrow(0, start, ka + m) for name, p in self.named_parameters(recurse=False)}
            return functional_call(self.view, params, (x.narrow(d, start, ka + m),))

        za, zb = run(0), run(ka)
        return torch.cat([za.narrow(d, 0, ka), wa * za.narrow(d, ka, m) + wb * zb.narrow(d, 0, m),
                          zb.narrow(d, m, kb)], d)

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Every view gathered from its positions, run, and put back, weighted per position (each position's
        weights are exactly 1 and 0 outside the shared units)."""
        d = self.dim % x.dim()
        shape = [1] * x.dim()
        shape[d] = -1
        out = 0
        for i, weight in enumerate(self.view_weights):
            index = getattr(self, f"view_{i}")
            params = {name: p.index_select(0, index) for name, p in self.named_parameters(recurse=False)}
            z = functional_call(self.view, params, (x.index_select(d, index),))
            out = out + torch.zeros_like(x).index_copy(d, index, z) * weight.to(x).view(shape)
        return out


def _widen_tensor(net: nn.Module, key: str, dim: int, width: int) -> None:
    """Give the parameter or buffer ``key`` of ``net`` ``width`` zeros along ``dim``: the values of state tensors
    come from the merged state dict, and a constant zero buffer outside the state stays zero."""
    owner, _, name = key.rpartition(".")
    module = net.get_submodule(owner) if owner else net
    t = getattr(module, name)
    shape = list(t.shape)
    shape[dim] = width
    new = t.new_zeros(shape)
    setattr(module, name, nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new)


def _fastest(forms: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> str:
    """The form whose run takes the least median time: each form is run alternately ``repeats`` times after
    one round that warms up (and fills any cache), between ``sync`` calls (a CUDA device's queue drained)."""
    times: dict[str, list[float]] = {form: [] for form in forms}
    for _ in range(repeats + 1):
        for form, run in forms.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[form].append(time.perf_counter() - t0)
    return min(times, key=lambda form: statistics.median(times[form][1:]))


def _run_as(layer: PartitionedLayer, execution: str, x: torch.Tensor) -> torch.Tensor:
    """The layer on ``x`` in the form ``execution`` (``blocks`` or ``dense``), which it keeps."""
    layer.execution = execution
    return layer(x)


def _tree_key(modules: list[nn.Module]) -> tuple[list, list]:
    """What a form computed from a module tree depends on: every tensor's storage and version and every
    module's children, read flat from the tree's ``modules`` (a changed child changes its parent's entry; a
    recursive walk over the tree costs about three times as much, which shows on a batch of one)."""
    tensors = [(t.data_ptr(), t._version) for m in modules for held in (m._parameters, m._buffers)
               for t in held.values() if t is not None]
    return tensors, [c for m in modules for c in m._modules.values()]


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _per_unit_like(module: nn.Module, width: int) -> nn.Module:
    """A copy of a per-unit module (a BatchNorm of any kind, timm's BatchNormAct2d included, or a
    depthwise conv) resized to ``width`` units; its values come from the merged state dict."""
    units = module.out_channels if isinstance(module, nn.Conv2d) else module.num_features
    out = copy.deepcopy(module)
    for name, t in [*out.named_parameters(recurse=False), *out.named_buffers(recurse=False)]:
        if t is not None and t.dim() >= 1 and t.shape[0] == units:
            new = t.new_empty(width, *t.shape[1:])
            setattr(out, name, nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new)
    if isinstance(module, nn.Conv2d):
        out.in_channels = out.out_channels = out.groups = width
    else:
        out.num_features = width
    return out


class PartialMergedModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hubmerge",
    tags=["hubmerge", "model-merging", "partial-merging"],
    repo_url="https://pypi.org/project/hubmerge/",
):
    """A partially merged model: the base architecture with every layer partitioned per group.

    ``partition[group] = (k_A, m, k_B)``, or ``(k_0, m, k_1, …, k_{N−1})`` for an N-way partial merge. The
    config (``architecture``, ``model_args``, ``partition``, ``alpha``, ``cross``, ``endpoints``, ``settings``,
    ``preprocess``, ``input_size``, and for an N-way merge the endpoints' ``weights``, for endpoints of
    separate tasks their ``tasks``: which outputs are whose) is enough to rebuild the empty model, so :meth:`from_pretrained` needs nothing but the repo; loading is strict
    and safetensors-only. ``preprocess`` (``input_size``, ``mean``, ``std``, as the endpoints were fed)
    overrides the architecture's defaults in ``pretrained_cfg``. ``input_size`` (C, H, W) is the size the
    merge was calibrated and its spec traced at, which for a model built with ``img_size`` differs from timm's
    default cfg.
    """

    def __init__(self, architecture: str, model_args: dict, partition: dict[str, list[int]],
                 alpha: float = 0.5, cross: str = "interpolate", endpoints: dict | None = None,
                 settings: dict | None = None, preprocess: dict | None = None, input_size: list[int] | None = None,
                 weights: list[float] | None = None, tasks: list[dict] | None = None,
                 hubmerge_version: str = __version__):
        super().__init__()
        self.architecture, self.model_args = architecture, dict(model_args)
        self.alpha, self.cross = alpha, cross
        # an N-way merge's model weights; two endpoints weigh 1−α and α
        self.weights = tuple(weights) if weights else (1 - alpha, alpha)
        self.endpoints, self.settings, self.preprocess = endpoints or {}, settings or {}, preprocess
        self.input_size = list(input_size) if input_size else None
        # separate tasks: which outputs answer which endpoint's task (None: one task, the logits averaged)
        self.tasks = tuple(Task.from_dict(t) for t in tasks) if tasks else None
        self.hubmerge_version = hubmerge_version
        net = build_model(architecture, self.model_args)
        self.spec = spec_for(net, tuple(input_size) if input_size else None)
        self.partition = self._check_partition(partition)
        if self.spec.partial is None:
            self._partition(net)
        # the endpoints' input preprocessing, not the architecture's default, so evaluating the merge
        # normalises data as the merge itself was measured
        self.pretrained_cfg = {**getattr(net, "pretrained_cfg", {}), **(preprocess or {})}
        labels = union_labels(self.tasks) if self.tasks else None
        if labels:
            self.pretrained_cfg["label_names"] = labels
        self.net = net.eval()
        self.execution = "layers"  # or "zero-padded" (see :meth:`plan_execution`)

    def _check_partition(self, partition: dict[str, list[int]]) -> dict[str, Sizes]:
        if set(partition) != set(self.spec.groups):
            raise CheckpointError(f"partition groups {sorted(partition)} do not match the {self.architecture} "
                                  f"spec's groups {sorted(self.spec.groups)}")
        n = len(self.weights)
        for g, sizes in partition.items():
            width, own_sizes = self.spec.groups[g].width, [*sizes[:1], *sizes[2:]]
            # (an N-way full merge's sizes are (0, m, 0), saved so before N-way partial merges)
            wrong_length = len(sizes) < 3 or len(sizes) != n + 1 and any(own_sizes)
            if wrong_length or any(k + sizes[1] != width for k in own_sizes):
                raise CheckpointError(f"group {g}: sizes {tuple(sizes)} do not hold all {width} units of each of "
                                      f"the {n} endpoints")
            if any(own_sizes) and self.spec.partial is not None:
                raise CheckpointError(f"group {g} is widened, but {self.architecture} cannot be partially merged "
                                      f"({self.spec.partial})")
            if any(own_sizes) and g in self.spec.fixed:
                raise CheckpointError(f"group {g} is widened, but cannot widen ({self.spec.fixed[g]})")
        for tie in self.spec.ties:
            if len({tuple(partition[g]) for g in tie}) > 1:
                raise CheckpointError(f"groups {list(tie)} are the blocks of one grouped conv and must be widened "
                                      f"alike; sizes {[tuple(partition[g]) for g in tie]}")
        for h in self.spec.heads:
            for head in h.heads:
                apart = {partition[g][0] == self.spec.groups[g].width for g in head}
                if len(apart) != 1 or not (apart.pop() or all(partition[g][0] == 0 for g in head)):
                    sizes = [tuple(partition[g]) for g in head]
                    raise CheckpointError(f"a head of {h.module} (groups {list(head)}) is partly kept apart: "
                                          f"sizes {sizes}; heads merge or stay apart whole")
        return {g: tuple(int(s) for s in v) for g, v in partition.items()}

    def _partition(self, net: nn.Module) -> None:
        """Replace the base model's layers, norms and per-unit tensors by their partitioned versions."""
        across = {a.layer: a for a in self.spec.across}
        for layer in self.spec.layers:
            out, inp = sections(layer.out_axis, self.partition), sections(layer.in_axis, self.partition)
            template = net.get_submodule(layer.name)
            if layer.norm:
                _replace(net, layer.norm, _per_unit_like(net.get_submodule(layer.norm), len(out)))
            passing = across.get(layer.name)
            passing = None if passing is None else sections(passing.axis, self.partition)
            if layer.depthwise:
                wide = _per_unit_like(template, len(out))
            elif passing is not None and (passing != SHARED).any():
                wide = SectionwiseLayer(template, passing, across[layer.name].dim, len(self.weights))
            elif layer.standardised:
                wide = PartitionedStdConv(template, out, inp, self.weights, self.cross)
            else:
                wide = PartitionedLayer(template, out, inp)
            _replace(net, layer.name, wide)
        for module in net.modules():  # attention sized by its heads, which may widen apart from its input
            run_wide(module)
        for h in self.spec.heads:  # a head kept apart is two heads of the merged attention (N of an N-way merge)
            if not h.apart(self.partition):  # (heads of an attention that cannot widen never are)
                continue
            module = net.get_submodule(h.module)
            count = len(h.heads) + (len(self.weights) - 1) * h.apart(self.partition)
            HEAD_COUNTS[type(module)].set(module, count)
            for key, dim in h.tables:  # and has its entry in each per-head table
                _widen_tensor(net, key, dim, count)
        for norm in self.spec.norms:
            widened = sections(norm.axis, self.partition)
            if (widened != SHARED).any():  # fully merged groups keep the plain norm
                _replace(net, norm.name, PartitionedNorm(net.get_submodule(norm.name), widened, norm.dim,
                                                         self.weights))
        for vector in self.spec.vectors + self.spec.zeros:
            _widen_tensor(net, vector.key, vector.dim, len(sections(vector.axis, self.partition)))
        for width in self.spec.widths:  # a cut keeping every channel keeps every merged channel
            setattr(net.get_submodule(width.module), width.attribute, len(sections(width.axis, self.partition)))

    def partitioned_layers(self) -> tuple[Layer, ...]:
        """The layers stored as partitioned blocks; none where the family only takes full merges, whose
        merge is the plain architecture."""
        return self.spec.layers if self.spec.partial is None else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "zero-padded" and not self.training and not torch.is_grad_enabled():
            plain = self._zero_padded()
            if plain is not None:
                return plain(x)
        return self.net(x)

    def _zero_padded(self) -> nn.Module | None:
        """:meth:`materialize`, kept while the model's tensors and modules stay as they are (as
        :meth:`PartitionedLayer._cached` checks its blocks; buffers too, which RESET re-estimates): a cache,
        not state. None where a module of the model is hooked: the hook expects to run."""
        held = self.__dict__.get("_plain")
        if held is None or _tree_key(held[0]) != held[1]:
            modules = list(self.net.modules())
            self.__dict__["_plain"] = held = (modules, _tree_key(modules), self.materialize().eval())
        return None if any(m._forward_hooks or m._forward_pre_hooks for m in held[0]) else held[2]

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of a model of separate tasks, per task (named after its endpoint: ``a``, ``b``, …)."""
        if not self.tasks:
            raise UsageError("this merge answers one task: its logits are not split by task")
        return {t.name: logits[:, t.outputs] for t in self.tasks}

    @torch.no_grad()
    def plan_execution(self, x: torch.Tensor, repeats: int = 7) -> dict[str, str]:
        """Choose, for every layer stored as several blocks, whether inference runs the blocks or one
        zero-padded op (joined from the blocks, never stored): each form is timed on the input the layer
        sees for ``x``, a batch like those the model will run, alternately ``repeats`` times, and the faster
        median wins. Layers timed alone do not add up to the whole model (and each wrapper costs its Python
        call on a small batch), so the whole model is then timed the same way in three forms: with these
        choices, every layer's blocks, and the plain zero-padded model (:meth:`materialize`, kept in memory
        next to the blocks and made again when a tensor changes; :attr:`execution` ``"zero-padded"``), and
        the fastest is kept. Storage stays partitioned; training, gradients and forward hooks always run the
        blocks. Returns the choice per layer (every layer ``dense`` where the zero-padded model won)."""
        layers = {name: m for name, m in self.net.named_modules()
                  if isinstance(m, PartitionedLayer) and not hasattr(m, "whole")}
        self.execution = "layers"
        seen: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
                   for name, m in layers.items()]
        try:
            self.eval()(x)
        finally:
            for h in handles:
                h.remove()
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        for name, m in layers.items():  # (the first round warms up and joins the dense weight)
            runs = {form: lambda form=form: _run_as(m, form, seen[name]) for form in ("blocks", "dense")}
            m.execution = _fastest(runs, repeats, sync)
        chosen = {name: m.execution for name, m in layers.items()}
        forms = {"chosen": ("layers", chosen), "blocks": ("layers", dict.fromkeys(layers, "blocks")),
                 "zero-padded": ("zero-padded", dict.fromkeys(layers, "dense"))}
        # (the first round joins the zero-padded model)
        best = _fastest({form: lambda form=form: (self._execute(layers, *forms[form]), self(x)) for form in forms},
                        repeats, sync)
        self._execute(layers, *forms[best])
        if best != "zero-padded":
            self.__dict__.pop("_plain", None)  # (its memory is not held for a form that lost)
        return dict(forms[best][1])

    def _execute(self, layers: dict[str, PartitionedLayer], execution: str, per_layer: dict[str, str]) -> None:
        """Run the model as ``execution`` says (``layers``: each layer in its own form, ``zero-padded``: the
        plain model), the layers as ``per_layer`` says."""
        self.execution = execution
        for name, m in layers.items():
            m.execution = per_layer[name]

    def layer(self, name: str) -> PartitionedLayer | nn.Conv2d:
        """The partitioned module of a spec layer (a plain, resized conv for a depthwise one)."""
        return self.net.get_submodule(name)

    def materialize(self) -> nn.Module:
        """An equivalent plain model (zero-padded wide layers; a :class:`SectionwiseLayer` stays one, as no plain
        layer runs copies on sections); for γ=0 it is the base timm model."""
        net = copy.deepcopy(self.net)
        for layer in self.partitioned_layers():
            module = net.get_submodule(layer.name)
            if isinstance(module, PartitionedLayer):
                _replace(net, layer.name, module.dense())
        return net

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """hubmerge's card (what the model is, its endpoints, settings, partition, usage, citations) for
        ``save_pretrained`` / ``push_to_hub``, instead of the mixin's generic one; ``hubmerge run`` replaces
        it with the full card of the merge (metrics, allocation, recipe)."""
        from .card import build  # the card is rendered from this model; imported only when saving

        return build(self, repo_id=kwargs.get("repo_id") or "path/to/this/folder")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", strict: bool = True,
                         **model_kwargs):
        """The mixin's loader, made strict and safetensors-only: a missing, extra, misshapen or truncated
        tensor is an error, and a pickle checkpoint is refused."""
        return load_checkpoint(cls, model_id=model_id, revision=revision, cache_dir=cache_dir,
                               force_download=force_download, local_files_only=local_files_only, token=token,
                               map_location=map_location, model_kwargs=model_kwargs)
