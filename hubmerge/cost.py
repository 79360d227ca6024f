"""Cost model: non-zero parameters and FLOPs of a partitioned model (method §4), the units of the budget.

Per layer and group of its output rows, non-zero weights = (k_A·(k_A′+m′) + m·w′ + k_B·(m′+k_B′)) × kernel
size (primes: the sections of the input axis, summed over its segments, times the flatten stride), plus one
bias per output unit and two affine norm parameters per unit; norms, layer scales and other per-unit
tensors outside the layers add their parameters per unit of their group. A layer run along another axis than
units passing it by (a token MLP, :class:`~hubmerge.spec.Across`) has a copy per section of those units, and
runs on as many positions as they have; both count for their group. FLOPs
count 2 per multiply-accumulate of conv/linear layers at the given input resolution (norms, activations
and pooling are left out, which the relative increase barely notices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .partial import SHARED, Sizes, padded, section_count
from .spec import Layer, PermutationSpec, Segment
from .statistics import unit_dim


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's cost depends on besides the partition."""

    kernel: int  # weights per (output unit, input entry) pair: kh·kw for a conv, 1 for a linear
    positions: int  # output spatial positions per sample at the probed resolution
    bias: bool
    unit_params: int  # other parameters per unit: the following norm's affine ones, a standardised conv's gain


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.flops + other.flops)


def _weighted(module: nn.Module) -> nn.Module:
    """The module itself, or the first sub-layer of a partitioned one."""
    return module if hasattr(module, "weight") else next(m for m in module.children() if hasattr(m, "weight"))


@torch.no_grad()
def _probe(net: nn.Module, hooks: dict[str, object], input_size: tuple[int, ...]) -> None:
    """One forward pass of a zero batch at ``input_size`` (C, H, W) with forward hooks on named modules."""
    handles = [net.get_submodule(name).register_forward_hook(fn) for name, fn in hooks.items()]
    param = next(net.parameters())
    try:
        net.eval()(torch.zeros(1, *input_size, dtype=param.dtype, device=param.device))
    finally:
        for h in handles:
            h.remove()


def geometry(net: nn.Module, spec: PermutationSpec, input_size: tuple[int, ...]) -> dict[str, LayerGeometry]:
    """Probe one forward pass at ``input_size`` (C, H, W) to learn each layer's output positions."""
    positions: dict[str, int] = {}
    # a layer run along another axis holds the units passing it by there: counted at one endpoint's width, so a
    # merged net (whose copies run on the widened units) probes to the same geometry
    across = {a.layer: (a.dim, sum(seg.width for seg in a.axis)) for a in spec.across}

    def count(name: str):
        dim = unit_dim(net.get_submodule(name))
        passing, width = across.get(name, (None, 1))

        def record(_m, _i, out):
            n = out[0].numel() // out.shape[dim]
            positions[name] = n if passing is None else n // out.shape[passing] * width
        return record

    _probe(net, {l.name: count(l.name) for l in spec.layers}, input_size)
    geo = {}
    for l in spec.layers:
        module = net.get_submodule(l.name)
        w, norm = _weighted(module), net.get_submodule(l.norm) if l.norm else None
        # a partitioned weight-standardised conv holds its bias and gain itself, its blocks only weights
        bias = getattr(module, "bias", None) is not None or w.bias is not None
        geo[l.name] = LayerGeometry(
            kernel=w.weight[0, 0].numel(), positions=positions[l.name], bias=bias,
            unit_params=(2 if norm is not None and norm.affine else 0) + (getattr(module, "gain", None) is not None),
        )
    return geo


def layer_cost(layer: Layer, geo: LayerGeometry, partition: dict[str, Sizes]) -> dict[str | None, Cost]:
    """Closed-form cost of one partitioned layer, per group of its output axis (None: its fixed rows): shared
    rows read every input, each endpoint's own rows its own and the shared inputs."""
    count = section_count(partition)

    def sizes(seg: Segment) -> Sizes:
        return padded(tuple(partition[seg.group]) if seg.group is not None else (0, seg.width), count)

    cols = [sum(sizes(seg)[i] * seg.repeat for seg in layer.in_axis) for i in range(count)]
    out: dict[str | None, Cost] = {}
    for seg in layer.out_axis:
        rows = sizes(seg)
        units = sum(rows)
        if layer.depthwise:  # one filter per unit
            weights = units * geo.kernel
        else:
            weights = sum(k * (sum(cols) if s == SHARED else cols[s] + cols[SHARED]) for s, k in enumerate(rows))
            weights *= geo.kernel
        cost = Cost(weights + units * (geo.bias + geo.unit_params), 2 * weights * geo.positions)
        out[seg.group] = out[seg.group] + cost if seg.group in out else cost
    return out


@dataclass(frozen=True)
class CostReport:
    """Per-layer, per-group (layers writing into the group) and total cost."""

    layers: dict[str, Cost]
    groups: dict[str, Cost]
    total: Cost

    def to_dict(self) -> dict:
        return {"total": asdict(self.total), "groups": {g: asdict(c) for g, c in self.groups.items()}}


def per_unit_params(spec: PermutationSpec, net: nn.Module) -> dict[str, int]:
    """Parameters per unit of each group outside conv/linear layers and their BatchNorms: norms and
    per-unit modules (LayerNorm, layer scales) and per-unit vectors, which widen with their group."""
    state = net.state_dict()
    out = {g: 0 for g in spec.groups}
    for n in spec.norms:  # every parameter of a norm is a vector over the units (of each segment)
        for seg in n.axis:
            out[seg.group] += len(list(net.get_submodule(n.name).parameters()))
    params = dict(net.named_parameters())
    for v in spec.vectors:  # per unit: its entries along the other dims (a buffer, BN statistics, costs none)
        for seg in v.axis if v.key in params else ():
            if seg.group is not None:
                out[seg.group] += state[v.key].numel() // state[v.key].shape[v.dim]
    return out


def per_head_params(spec: PermutationSpec, net: nn.Module) -> dict[str, int]:
    """Parameters per head of each attention's per-head tables (a relative position bias), which a head kept
    apart has once per endpoint (A's entries and B's)."""
    params = dict(net.named_parameters())
    return {h.module: sum(params[key].numel() // params[key].shape[dim] for key, dim in h.tables if key in params)
            for h in spec.heads}


def unitless_params(spec: PermutationSpec, net: nn.Module) -> int:
    """Parameters outside the layers and per-head tables that hold no units (EVA's q bias, whose dims rotary
    fixes): every merge has them once."""
    modules = tuple(f"{m}." for m in [*(n for l in spec.layers for n in (l.name, l.norm) if n),
                                       *(n.name for n in spec.norms)])
    tables = {key for h in spec.heads for key, _ in h.tables}
    return sum(p.numel() for n, p in net.named_parameters()  # (the modules' names hold in a partitioned net too)
               if n not in spec.axes and n not in tables and not n.startswith(modules))


def cost(spec: PermutationSpec, geo: dict[str, LayerGeometry], partition: dict[str, Sizes],
         per_unit: dict[str, int] | None = None, per_head: dict[str, int] | None = None, unitless: int = 0
         ) -> CostReport:
    """Cost of the model with ``partition``; ``per_unit[group]``: parameters per unit outside the layers
    (:func:`per_unit_params`), ``per_head[attention]`` per head of its tables (:func:`per_head_params`, counted
    for each head's first group), ``unitless`` those with no units (:func:`unitless_params`). A layer's cost
    counts for the groups of its output rows."""
    layers, groups = {}, {g: Cost(0, 0) for g in spec.groups}
    for g, k in (per_unit or {}).items():
        groups[g] = Cost(k * sum(partition[g]), 0)
    tables = 0
    for h in spec.heads:
        for head in h.heads:
            k = (per_head or {}).get(h.module, 0) * (len(partition[head[0]]) - 1 if partition[head[0]][0] else 1)
            groups[head[0]], tables = groups[head[0]] + Cost(k, 0), tables + k
    for l in spec.layers:
        by_group = layer_cost(l, geo[l.name], partition)
        layers[l.name] = sum(by_group.values(), Cost(0, 0))
        for g, c in by_group.items():
            if g is not None:
                groups[g] = groups[g] + c
    for a in spec.across:  # one copy per section of the units passing by, each run on its section's positions
        one, width = layers[a.layer], sum(seg.width for seg in a.axis)
        sizes = [partition[seg.group] for seg in a.axis]
        copies = sum(any(s[i] for s in sizes if i < len(s)) for i in range(section_count(partition)))
        for seg, s in zip(a.axis, sizes):  # the positions a widened segment adds: the other endpoints' own units
            added = sum(s) - seg.width
            extra = Cost(one.params * (copies - 1) if seg is a.axis[0] else 0, one.flops * added // width)
            layers[a.layer], groups[seg.group] = layers[a.layer] + extra, groups[seg.group] + extra
    total = sum(layers.values(), Cost(0, 0))
    total = total + Cost(sum(k * sum(partition[g]) for g, k in (per_unit or {}).items()) + tables + unitless, 0)
    return CostReport(layers, groups, total)


def full_partition(spec: PermutationSpec) -> dict[str, Sizes]:
    """One endpoint's partition: every unit shared."""
    return {g: (0, grp.width, 0) for g, grp in spec.groups.items()}


def dense_cost(net: nn.Module, input_size: tuple[int, ...]) -> Cost:
    """Parameters and conv/linear FLOPs of a plain model: the cost of a family that only takes full merges,
    whose merge has the endpoint's size."""
    flops = []
    _probe(net, {name: lambda m, _i, out: flops.append(2 * out[0].numel() * m.weight[0].numel())
                 for name, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}, input_size)
    return Cost(sum(p.numel() for p in net.parameters()), sum(flops))


class CostModel:
    """Costs of any partition of one architecture, relative to one endpoint (what the budget counts)."""

    def __init__(self, spec: PermutationSpec, net: nn.Module, input_size: tuple[int, ...]):
        self.spec = spec
        if spec.partial is not None:  # no group can widen: every valid partition costs what one endpoint does
            self.endpoint = dense_cost(net, input_size)
            return
        self.geo = geometry(net, spec, input_size)
        self.per_unit = per_unit_params(spec, net)
        self.per_head = per_head_params(spec, net)
        self.unitless = unitless_params(spec, net)
        self.endpoint = self(full_partition(spec)).total

    def __call__(self, partition: dict[str, Sizes]) -> CostReport:
        if self.spec.partial is not None:
            return CostReport({}, {g: Cost(0, 0) for g in self.spec.groups}, self.endpoint)
        return cost(self.spec, self.geo, partition, self.per_unit, self.per_head, self.unitless)

    def increase(self, partition: dict[str, Sizes]) -> dict[str, float]:
        """Relative increase over one endpoint, in parameters and in FLOPs."""
        total = self(partition).total
        return {"params": total.params / self.endpoint.params - 1, "flops": total.flops / self.endpoint.flops - 1}
